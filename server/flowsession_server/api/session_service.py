"""SessionService: thin servicers. Status rules live in domain/lifecycle, writes in the store."""
from __future__ import annotations

import hashlib
from typing import AsyncIterator

import grpc

from flowsession.v1 import session_service_pb2 as pb, session_service_pb2_grpc

from ..domain import lifecycle, limits, paging, validation
from ..domain.errors import OutOfRange, Violations
from ..events.hub import Hub
from ..store.codec import to_us
from ..store.commands import IdempotencyKey, NewSession
from ..store.reads import EVENT_PAGE
from ..store.store import Store, new_id
from . import convert, errors, tokens


def _fingerprint(request: object) -> str:
    """A stable digest of a request without its request_id: the same retry matches, another payload not."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("request_id")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def _session_ref(v: Violations, request, environments: frozenset[str]) -> None:
    validation.environment(v, request.environment, environments)
    validation.identifier(v, "session_id", request.session_id)


def _expected_version(v: Violations, value: int) -> None:
    if value < 0:
        v.add("expected_version", "must not be negative")


class SessionService(session_service_pb2_grpc.SessionServiceServicer):
    def __init__(self, store: Store, hub: Hub, environments: frozenset[str]):
        self._store = store
        self._hub = hub
        self._environments = environments

    @property
    def _epoch(self) -> str:
        return self._store.keys.epoch

    @errors.unary
    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateSessionResponse:
        v = Violations()
        validation.identifier(v, "flow_id", request.flow_id)
        validation.environment(v, request.environment, self._environments)
        if request.input.ByteSize() > limits.MAX_INPUT_BYTES:
            v.add("input", f"must be at most {limits.MAX_INPUT_BYTES} bytes serialized (got {request.input.ByteSize()})")
        validation.metadata(v, request.metadata)
        validation.redirect_url(v, request.redirect_url)
        validation.text(v, "state", request.state, max_len=limits.MAX_STATE)
        validation.text(v, "request_id", request.request_id, max_len=limits.MAX_REQUEST_ID)
        v.raise_if_any()
        new = NewSession(
            session_id=new_id("ses"),
            flow_id=request.flow_id,
            environment=request.environment,
            input=convert.struct_to_dict(request.input),
            metadata=dict(request.metadata),
            redirect_url=request.redirect_url,
            state=request.state,
        )
        key = None
        if request.request_id:
            key = IdempotencyKey(f"create:{request.environment}", request.request_id, _fingerprint(request))
        session, _ = await self._store.create_session(new, key)
        return pb.CreateSessionResponse(
            session=convert.session_pb(session), session_token=tokens.issue(session, self._store.keys.token_key)
        )

    @errors.unary
    async def GetSession(self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext) -> pb.GetSessionResponse:
        v = Violations()
        _session_ref(v, request, self._environments)
        v.raise_if_any()
        session = await self._store.get_session(request.environment, request.session_id)
        return pb.GetSessionResponse(session=convert.session_pb(session))

    @errors.unary
    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        v = Violations()
        validation.environment(v, request.environment, self._environments)
        if request.flow_id:
            validation.identifier(v, "flow_id", request.flow_id)
        statuses = []
        for i, value in enumerate(request.statuses):
            status = convert.STATUS_FROM_PB.get(value)
            if status is None:
                v.add(f"statuses[{i}]", f"not a session status: {value}")
            else:
                statuses.append(status)
        size = validation.page_size(v, request.page_size)
        v.raise_if_any()
        key = self._store.keys.page_key
        query = ["sessions", request.environment, request.flow_id, sorted(s.value for s in statuses)]
        after = paging.decode(key, query, request.page_token)
        found = await self._store.list_sessions(request.environment, request.flow_id, statuses, after, size + 1)
        token = ""
        if len(found) > size:
            found = found[:size]
            token = paging.encode(key, query, [to_us(found[-1].create_time), found[-1].session_id])
        return pb.ListSessionsResponse(sessions=[convert.session_pb(s) for s in found], next_page_token=token)

    @errors.unary
    async def ReportStepResult(
        self, request: pb.ReportStepResultRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportStepResultResponse:
        v = Violations()
        _session_ref(v, request, self._environments)
        validation.token(v, "step_id", request.step_id, max_len=limits.MAX_STEP_ID)
        validation.token(v, "verdict", request.verdict, max_len=limits.MAX_VERDICT)
        validation.text(v, "request_id", request.request_id, max_len=limits.MAX_REQUEST_ID)
        _expected_version(v, request.expected_version)
        v.raise_if_any()
        key = None
        if request.request_id:
            key = IdempotencyKey(f"report:{request.session_id}", request.request_id, _fingerprint(request))
        verb = lambda session, flow_version, now: lifecycle.report_step(  # noqa: E731
            session,
            flow_version,
            step_id=request.step_id,
            verdict=request.verdict,
            now=now,
            expected_version=request.expected_version,
        )
        session = await self._store.change_session(request.environment, request.session_id, verb, key)
        return pb.ReportStepResultResponse(session=convert.session_pb(session))

    @errors.unary
    async def AbortSession(
        self, request: pb.AbortSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortSessionResponse:
        v = Violations()
        _session_ref(v, request, self._environments)
        validation.text(v, "reason", request.reason, max_len=limits.MAX_REASON, required=True)
        _expected_version(v, request.expected_version)
        v.raise_if_any()
        verb = lambda session, _fv, now: lifecycle.abort(  # noqa: E731
            session, reason=request.reason, now=now, expected_version=request.expected_version
        )
        session = await self._store.change_session(request.environment, request.session_id, verb)
        return pb.AbortSessionResponse(session=convert.session_pb(session))

    @errors.unary
    async def FailSession(self, request: pb.FailSessionRequest, context: grpc.aio.ServicerContext) -> pb.FailSessionResponse:
        v = Violations()
        _session_ref(v, request, self._environments)
        validation.token(v, "step_id", request.step_id, max_len=limits.MAX_STEP_ID, required=False)
        validation.token(v, "error_code", request.error_code, max_len=limits.MAX_ERROR_CODE)
        validation.text(v, "error_message", request.error_message, max_len=limits.MAX_ERROR_MESSAGE)
        _expected_version(v, request.expected_version)
        v.raise_if_any()
        verb = lambda session, _fv, now: lifecycle.fail(  # noqa: E731
            session,
            step_id=request.step_id,
            code=request.error_code,
            message=request.error_message,
            now=now,
            expected_version=request.expected_version,
        )
        session = await self._store.change_session(request.environment, request.session_id, verb)
        return pb.FailSessionResponse(session=convert.session_pb(session))

    @errors.stream
    async def WatchSession(
        self, request: pb.WatchSessionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchSessionResponse]:
        v = Violations()
        _session_ref(v, request, self._environments)
        if request.after_version < 0:
            v.add("after_version", "must not be negative")
        v.raise_if_any()
        # Subscribe before reading the log: whatever commits in between arrives live and is deduplicated.
        watcher = self._hub.subscribe(request.session_id)
        try:
            session = await self._store.get_session(request.environment, request.session_id)
            if request.after_version > session.version:
                raise OutOfRange(
                    f"after_version {request.after_version} is beyond the session's version {session.version}",
                    reason="VERSION_AHEAD",
                    metadata={"version": str(session.version)},
                )
            # after_version 0 starts from the current state: the event that produced it.
            if session.status.terminal and request.after_version == session.version:
                return  # the caller already has the terminal event
            start = request.after_version or session.version - 1
            last = start
            pending = await self._store.events_after(request.session_id, start)
            while True:
                for event in pending:
                    if event.version <= last:
                        continue
                    yield pb.WatchSessionResponse(event=convert.event_pb(event, self._epoch))
                    last = event.version
                    if event.terminal:
                        return
                if len(pending) >= EVENT_PAGE:  # a long history: read the next page of the log
                    pending = await self._store.events_after(request.session_id, last)
                    continue
                live = await watcher.next()
                if live.version <= last:
                    pending = []
                elif live.version == last + 1:
                    pending = [live]
                else:  # a gap (another process committed in between): refill from the log
                    pending = await self._store.events_after(request.session_id, last)
        finally:
            self._hub.unsubscribe(watcher)
