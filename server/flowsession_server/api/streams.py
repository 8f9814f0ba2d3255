"""The two watch streams. Both register with the hub before reading the log, send events in order with no
gap and no duplicate, send heartbeats when idle, and end promptly when the hub ends their watcher (too
slow, shutdown) even while blocked sending to a client that stopped reading."""
from __future__ import annotations

import asyncio
import copy
import logging
import random
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import grpc

from flowsession.v1 import session_service_pb2 as pb

from ..clock import Clock
from ..domain.errors import DomainError, FieldViolation, InvalidArgument, OutOfRange, Unavailable
from ..domain.model import LogPosition, SessionEvent, SessionStatus
from ..events.hub import Hub, Lost, Watcher
from ..store.reads import EVENT_PAGE
from ..store.store import Store
from . import convert

log = logging.getLogger(__name__)

MAX_CURSOR = 2**63 - 1  # SQLite's largest integer
_SERVICE = pb.DESCRIPTOR.services_by_name["SessionService"].full_name
WATCH_METHODS = (f"/{_SERVICE}/WatchSession", f"/{_SERVICE}/WatchSessions")
GRPC_AIO_LOGGER = "grpc._cython.cygrpc"
_FINAL_STATUS_FAILED = "ExecuteBatchError raised in core by servicer method ["


class ClientGoneFilter(logging.Filter):
    """For grpc.aio's logger: a watch stream's final status that could not be sent because its client left
    is not an error. A stream cut while its client read nothing (too slow, a shutdown) has its status
    wait behind the message flow control holds back; when that client disconnects, the status batch
    fails before grpc.aio has seen the client go, so it logged an ERROR with a traceback for every such
    client. The watch methods' own writes turn that failure into a cancellation (_Sender), so on them it
    can only be the final status: logged here at DEBUG, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        if not isinstance(message, str) or not message.startswith(_FINAL_STATUS_FAILED):
            return True
        method = message[len(_FINAL_STATUS_FAILED) :].rstrip("]")
        if method not in WATCH_METHODS:
            return True
        log.debug("%s: the client left before the stream's final status was sent", method)
        return False


CLIENT_GONE_FILTER = ClientGoneFilter()


@dataclass
class _Current:
    """How far a WatchSessions stream got in sending include_current's sessions."""

    sent: LogPosition | None = None


@dataclass(frozen=True)
class WatchSettings:
    heartbeat: float  # seconds of idleness before a heartbeat
    max_opening: int  # streams allowed to replay their backlog at once; more are shed with RetryInfo


class _Sender:
    """Writes to the stream; a watcher ended from outside interrupts a write blocked on flow control."""

    def __init__(self, context: grpc.aio.ServicerContext, watcher: Watcher):
        self._context = context
        self._watcher = watcher
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._sending = False
        self.interrupted = False
        watcher.on_end(self._interrupt)

    def _interrupt(self) -> None:
        if self._sending and self._task is not None:
            self.interrupted = True
            self._task.cancel()

    async def headers(self) -> None:
        try:
            await self._context.send_initial_metadata(())
        except grpc.aio.InternalError:  # as in send: the client went away
            raise asyncio.CancelledError from None

    async def send(self, message: Any) -> None:
        # Ended while not sending (reading the log, say): _interrupt had nothing to cancel, and a send
        # now could block on a client that stopped reading with nothing left to interrupt it.
        if self._watcher.ended is not None:
            raise self._watcher.ended
        self._sending = True
        self._watcher.sending_since = self._loop.time()
        try:
            await self._context.write(message)
        except grpc.aio.InternalError:
            # A write blocked on flow control when the call ends under it (the client cancelled, its
            # deadline passed, the connection dropped) fails with grpc's ExecuteBatchError instead of
            # cancelling the task: the client went away, no server fault.
            raise asyncio.CancelledError from None
        finally:
            self._sending = False
            self._watcher.sending_since = None


class _Responses:
    """One response per (event, stream kind), serialized once and written as those bytes to every watcher
    it fans out to (the stream methods pass bytes through, errors.add_servicer): with thousands of
    watchers, converting and serializing each event once instead of once per stream is most of the cost."""

    def __init__(self, store: Store):
        self._store = store
        self._cache: convert.Kept[tuple[type, int], bytes] = convert.Kept()

    def get(self, kind: type, event: SessionEvent) -> bytes:
        key = (kind, event.cursor)
        response = self._cache.get(key)
        if response is None:
            assert self._store.keys is not None
            response = convert.event_response(kind, event, self._store.keys.epoch).SerializeToString()
            self._cache.keep(key, response)
        return response


class Streams:
    def __init__(self, store: Store, hub: Hub, clock: Clock, settings: WatchSettings):
        self._responses = _Responses(store)
        self._store = store
        self._hub = hub
        self._clock = clock
        self._settings = settings
        self._opening = 0

    @property
    def _epoch(self) -> str:
        assert self._store.keys is not None
        return self._store.keys.epoch

    def _heartbeat(self, *, position: LogPosition | None = None, version: int = 0) -> pb.WatchHeartbeat:
        # WatchSessions' heartbeat always names a cursor, the log's start too (nothing committed yet):
        # a client storing it resumes from there, where an empty one would mean "from now".
        return pb.WatchHeartbeat(
            cursor=convert.cursor_token(self._epoch, position) if position is not None else "",
            version=version,
            heartbeat_time=convert.timestamp(self._clock.now()),
        )

    async def _run(
        self,
        context: grpc.aio.ServicerContext,
        watcher: Watcher,
        body: Callable[[_Sender], Awaitable[None]],
        position: Callable[[], dict[str, str]],
    ) -> None:
        # Counted against --max-watchers until gRPC is done with the call, not only this handler
        # (Watcher.release): this task is the call's, and ends once its status went out. (Not
        # context.add_done_callback: the call state keeps those, a reference cycle per stream.)
        asyncio.current_task().add_done_callback(lambda _: watcher.release())  # type: ignore[union-attr]
        # The headers go out on their own, first. grpc.aio counts them sent only once the write carrying
        # them completes, so after interrupting a stream's first write the error status would carry them
        # again, grpc core refuses that batch (TOO_MANY_OPERATIONS), and the call stays open until the
        # shutdown grace runs out, without the client hearing why.
        sender = _Sender(context, watcher)
        try:
            await sender.headers()
            await body(sender)
        except asyncio.CancelledError:
            if not sender.interrupted:
                raise  # the client went away
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            error = watcher.ended
            assert error is not None
            raise _with_position(error, position()) from None
        except DomainError as error:
            if error is watcher.ended:  # too slow, or shutting down: say where to resume
                raise _with_position(error, position()) from None
            raise
        finally:
            watcher.close()

    def _admit(self) -> None:
        if self._opening >= self._settings.max_opening:
            raise Unavailable(
                "too many watch streams are opening at once; retry shortly",
                reason="SERVER_BUSY",
                retry_after=round(random.uniform(0.05, 0.5), 3),
            )
        self._opening += 1

    async def _next(self, watcher: Watcher) -> SessionEvent | Lost | None:
        """The next live event, or None when the stream has been idle for the heartbeat interval. (Lost
        comes only to WatchSessions watchers: Hub.lost.)"""
        return await watcher.next_within(self._settings.heartbeat)

    async def watch_session(self, request: pb.WatchSessionRequest, context: grpc.aio.ServicerContext) -> None:
        watcher = self._hub.watch_session(request.session_id)
        last = request.after_version

        async def history(*, from_current: bool = False) -> list[SessionEvent]:
            """The log after ``last``, refused when retention has deleted some of it (also mid-replay).
            ``from_current``: after_version 0, whose stream starts at the current state; should the
            session have changed since it was read and retention pruned the state read (no longer the
            latest), the oldest retained event is the current state to start from (the latest event,
            never pruned, is there), so nothing is refused."""
            pending = await self._store.events_after(request.session_id, last)
            first = pending[0].version if from_current and pending else last + 1
            # Anywhere in the page, not only at its start: retention deletes a session's versions oldest
            # first, but one pass of it goes on in several commits, and events stamped out of order
            # (processes' clocks apart, a clock stepped back) wait for their elders.
            resumable = _after_last_hole(pending, first)
            if resumable is not None:
                raise OutOfRange(
                    f"events after version {last} are no longer all retained; read the session and watch from 0",
                    reason="CURSOR_EXPIRED",
                    metadata={"oldest_version": str(resumable)},
                )
            return pending

        async def body(sender: _Sender) -> None:
            nonlocal last
            self._admit()
            try:
                session = await self._store.get_session(request.environment, request.session_id)
                if request.after_version > session.version:
                    raise OutOfRange(
                        f"after_version {request.after_version} is beyond the session's version {session.version}",
                        reason="VERSION_AHEAD",
                        metadata={"version": str(session.version)},
                    )
                if session.status.terminal and request.after_version == session.version:
                    return  # the caller already has the terminal event
                # after_version 0 starts from the current state: the event that produced it.
                last = request.after_version or session.version - 1
                pending = await history(from_current=not request.after_version)
            finally:
                self._opening -= 1
            while True:
                for event in pending:
                    if event.version <= last:
                        continue
                    await sender.send(self._responses.get(pb.WatchSessionResponse, event))
                    last = event.version
                    if event.terminal:
                        return
                if len(pending) >= EVENT_PAGE:  # a long history: read the next page of the log
                    pending = await history()
                    continue
                live = await self._next(watcher)
                if live is None:
                    await sender.send(pb.WatchSessionResponse(heartbeat=self._heartbeat(version=last)))
                    pending = []
                elif live.version <= last:
                    pending = []
                elif live.version == last + 1:
                    pending = [live]
                else:  # a gap (another process committed in between): refill from the log
                    pending = await history()

        await self._run(context, watcher, body, lambda: {"last_version": str(last)})

    async def watch_sessions(self, request: pb.WatchSessionsRequest, context: grpc.aio.ServicerContext) -> None:
        statuses = frozenset(convert.STATUS_FROM_PB[s] for s in request.statuses)

        def match(event: SessionEvent) -> bool:
            return (not request.flow_id or event.session.flow_id == request.flow_id) and (
                not statuses or event.session.status in statuses
            )

        watcher = self._hub.watch_environment(request.environment, match, catching_up=True)
        # From now: everything the hub publishes after this point reaches the watcher.
        last = self._hub.high_water
        current: _Current | None = None  # while include_current's sessions are being sent

        async def send(event: SessionEvent, sender: _Sender) -> None:
            nonlocal last
            await sender.send(self._responses.get(pb.WatchSessionsResponse, event))
            if event.cursor > last.cursor:
                last = event.position

        async def replay(sender: _Sender) -> None:
            """Sends the log after ``last`` until caught up with the hub; an overflow of the watcher's
            buffer meanwhile only means that more of it is read from the log."""
            while True:
                page = await self._store.environment_events(
                    request.environment, request.flow_id, statuses, last.cursor, EVENT_PAGE
                )
                # Read after the page: retention (one transaction, cursors up to the oldest position) may
                # have deleted events of the range while it was being replayed.
                oldest = await self._store.oldest_position()
                if oldest.cursor > last.cursor:
                    raise self._expired("events after the cursor were pruned while being replayed", oldest)
                for event in page:
                    await send(event, sender)
                if len(page) < EVENT_PAGE and not watcher.take_overflow():
                    return

        async def body(sender: _Sender) -> None:
            nonlocal last, current
            self._admit()
            try:
                if request.after_cursor:
                    last = await self._resume_point(request.after_cursor)
                    await replay(sender)
                elif request.include_current and (not statuses or SessionStatus.RUNNING in statuses):
                    up_to, after = last.cursor, 0
                    current = _Current()
                    while True:
                        page = await self._store.current_events(
                            request.environment, request.flow_id, after, up_to, EVENT_PAGE
                        )
                        for event in page:
                            await sender.send(self._responses.get(pb.WatchSessionsResponse, event))
                            current.sent = event.position
                        if len(page) < EVENT_PAGE:
                            break
                        after = page[-1].cursor
                    current = None
                    if watcher.take_overflow():  # live events that overflowed meanwhile are in the log
                        await replay(sender)
            finally:
                self._opening -= 1
            watcher.catching_up = False  # no await since the last overflow check: nothing slips between
            while True:
                live = await self._next(watcher)
                if live is None:
                    # Every matching event up to the hub's high water has been sent once the buffer is empty.
                    if watcher.idle and self._hub.high_water.cursor > last.cursor:
                        last = self._hub.high_water
                    await sender.send(pb.WatchSessionsResponse(heartbeat=self._heartbeat(position=last)))
                elif isinstance(live, Lost):
                    if live.through.cursor > last.cursor:
                        raise self._expired("events after the cursor were pruned before this server read them", live.through)
                elif live.cursor > last.cursor:
                    await send(live, sender)

        def position() -> dict[str, str]:
            # While the current sessions are sent, only the part sent is covered: resuming after the
            # last of them replays the log from there (the rest have later cursors); none sent, none.
            at = last if current is None else current.sent
            return {} if at is None else {"last_cursor": convert.cursor_token(self._epoch, at)}

        await self._run(context, watcher, body, position)

    async def _resume_point(self, token: str) -> LogPosition:
        parsed = convert.parse_cursor(token)
        if parsed is None:
            raise InvalidArgument.of([FieldViolation("after_cursor", "is not a cursor this service issued")])
        epoch, wanted, tagged = parsed
        # 16 hex digits reach past SQLite's integers; such a cursor is simply ahead of the log.
        oldest, head, found = await self._store.log_bounds(min(wanted.cursor, MAX_CURSOR))
        if epoch != self._epoch:
            raise self._expired("the cursor belongs to another database", oldest)
        if wanted.cursor < oldest.cursor:
            raise self._expired("events after the cursor are no longer retained", oldest)
        if wanted.cursor > head.cursor:
            raise self._expired("the cursor is ahead of this database (restored from a backup?)", oldest)
        # The event the cursor names: in the log, or the newest pruned one. A restored copy of the
        # database has another event there (or none), and would otherwise skip what came after it.
        actual = found if found is not None else oldest if wanted.cursor == oldest.cursor else None
        if tagged and actual is not None and actual.tag and actual.tag != wanted.tag:
            raise self._expired("the cursor names an event this database does not have (restored from a backup?)", oldest)
        return actual or wanted

    def _expired(self, why: str, oldest: LogPosition) -> OutOfRange:
        return OutOfRange(
            f"{why}; re-read with ListSessions and watch from now",
            reason="CURSOR_EXPIRED",
            metadata={"oldest_cursor": convert.cursor_token(self._epoch, oldest)},
        )


def _after_last_hole(events: list[SessionEvent], first: int) -> int | None:
    """None when ``events`` are versions ``first``, ``first`` + 1, ... with no hole; else the version
    after the last hole (the oldest one from which the rest follow on)."""
    expected, after_hole = first, None
    for event in events:
        if event.version != expected:
            after_hole = event.version
        expected = event.version + 1
    return after_hole


def _with_position(error: DomainError, position: dict[str, str]) -> DomainError:
    """A copy (the hub may share one error among watchers) that tells where to resume."""
    located = copy.copy(error)
    located.metadata = {**error.metadata, **position}
    return located
