"""SessionService: thin servicers. Status rules live in domain/lifecycle, writes in the store."""
from __future__ import annotations

import hashlib
import grpc

from flowsession.v1 import session_service_pb2 as pb, session_service_pb2_grpc

from ..domain import lifecycle, limits, paging, validation
from ..domain.errors import Violations
from ..domain.model import SessionStatus
from ..store.commands import IdempotencyKey, NewSession
from ..store.store import Store, new_id
from . import convert, errors, tokens
from .streams import Streams


def _fingerprint(request: object) -> str:
    """A stable digest of a request without its request_id: the same retry matches, another payload not.
    An empty message field counts as unset (``input`` sent as an empty Struct or not at all is the same
    request, stored alike), whichever way a client's generated code serializes it."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("request_id")
    for field, value in copy.ListFields():
        if field.message_type is not None and not field.is_repeated and not value.ByteSize():
            copy.ClearField(field.name)
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def _session_ref(v: Violations, request, environments: frozenset[str]) -> None:
    validation.environment(v, request.environment, environments)
    validation.identifier(v, "session_id", request.session_id)


def _statuses(v: Violations, values) -> list[SessionStatus]:
    """Each status once (a repeated one filters nothing more, and its page tokens stay valid). A value
    that is no status is refused once, at its first place; set operations first, so a request of a
    million values costs milliseconds, not a Python loop over them."""
    distinct = set(values)
    unknown = distinct.difference(convert.STATUS_FROM_PB)
    described: set[int] = set()
    for i, value in enumerate(values if unknown else ()):
        if len(described) == len(unknown) or v.full:
            break
        if value in unknown and value not in described:
            described.add(value)
            v.add(f"statuses[{i}]", f"not a session status: {value}")
    v.omit(len(unknown) - len(described))
    return sorted((convert.STATUS_FROM_PB[value] for value in distinct - unknown), key=lambda s: s.value)


def _expected_version(v: Violations, value: int) -> None:
    if value < 0:
        v.add("expected_version", "must not be negative")


class SessionService(session_service_pb2_grpc.SessionServiceServicer):
    def __init__(self, store: Store, streams: Streams, environments: frozenset[str], admission: errors.Admission):
        self._admission = admission
        self._store = store
        self._streams = streams
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
        try:
            session_input = convert.struct_to_dict(request.input)
        except ValueError as exc:  # NaN and Infinity have no JSON form
            v.add("input", f"is not representable as JSON: {exc}")
        else:
            validation.json_depth(v, "input", session_input, max_depth=limits.MAX_INPUT_DEPTH)
        v.raise_if_any()
        new = NewSession(
            session_id=new_id("ses"),
            flow_id=request.flow_id,
            environment=request.environment,
            input=session_input,
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
        statuses = _statuses(v, request.statuses)
        size = validation.page_size(v, request.page_size)
        v.raise_if_any()
        key = self._store.keys.page_key
        query = ["sessions", request.environment, request.flow_id, sorted(s.value for s in statuses)]
        after = paging.decode(key, query, request.page_token)
        sessions, token = await paging.read_page(
            key,
            query,
            lambda at, limit: self._store.list_sessions(request.environment, request.flow_id, statuses, at, limit),
            after,
            size,
            self._store.session_position,
            convert.session_pb,
            convert.byte_size,
        )
        return pb.ListSessionsResponse(sessions=sessions, next_page_token=token)

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

    @errors.unary
    async def WatchSession(self, request: pb.WatchSessionRequest, context: grpc.aio.ServicerContext) -> None:
        v = Violations()
        _session_ref(v, request, self._environments)
        if request.after_version < 0:
            v.add("after_version", "must not be negative")
        v.raise_if_any()
        await self._streams.watch_session(request, context)

    @errors.unary
    async def WatchSessions(self, request: pb.WatchSessionsRequest, context: grpc.aio.ServicerContext) -> None:
        v = Violations()
        validation.environment(v, request.environment, self._environments)
        if request.flow_id:
            validation.identifier(v, "flow_id", request.flow_id)
        _statuses(v, request.statuses)
        validation.text(v, "after_cursor", request.after_cursor, max_len=limits.MAX_ID)
        if request.after_cursor and request.include_current:
            v.add("include_current", "only applies when watching from now (empty after_cursor)")
        v.raise_if_any()
        await self._streams.watch_sessions(request, context)
