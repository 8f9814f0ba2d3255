"""Hand-written client facade over the generated flowsession.v1 stubs.

connect() opens a channel with keepalive settings, Client holds the stubs, FlowsessionError turns a
grpc.RpcError and its google.rpc rich status into plain attributes (CursorExpiredError for
CURSOR_EXPIRED), Client.watch() follows one session's events and Client.watch_sessions() an
environment's change feed, both resuming after UNAVAILABLE, WATCHER_TOO_SLOW and TOO_MANY_WATCHERS
without gaps or duplicates (watch_sessions() once it holds a cursor: a stream opened "from now" whose
connection breaks before its first cursor starts from now again; see its docstring).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import tenacity
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from flowsession.v1 import flow_service_pb2_grpc, session_pb2, session_service_pb2, session_service_pb2_grpc

# A watch stream can sit idle for minutes between events; proxies, NATs and load balancers drop
# idle TCP connections silently. Pinging every 60 s keeps the connection alive and a missed ack
# (20 s) turns a dead peer into UNAVAILABLE, which watch() resumes from. gRPC core waits for a
# ping's ack for grpc.http2.ping_timeout_ms (1 minute unless set), not keepalive_timeout_ms, so
# both are set: with only the latter a dead connection took 60 + 60 s to notice, not 60 + 20.
# max_pings_without_data=0 lifts the default cap of 2 pings while no data flows (an idle stream
# sends none), and permit_without_calls keeps pinging with no call open. The server permits pings
# without calls and every 30 s (grpc.http2.min_ping_interval_without_data_ms), so 60 s never earns
# a too_many_pings GOAWAY.
KEEPALIVE_OPTIONS: list[tuple[str, object]] = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.ping_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
_KEEPALIVE_TIMEOUT, _PING_TIMEOUT = "grpc.keepalive_timeout_ms", "grpc.http2.ping_timeout_ms"

# Re-opens without a server RetryInfo wait per tenacity's "full jitter" strategy: uniform in
# [0, min(5 s, 50 ms * 2^(n-1))] for the n-th consecutive re-open, so a restart's reconnect storm
# spreads out. gRPC's own connection backoff (wait_for_ready) only paces re-opens while the TCP
# connection is down; a live connection answering UNAVAILABLE (a proxy without an upstream) or
# RESOURCE_EXHAUSTED would otherwise be re-opened in a tight loop.
_RECONNECT = tenacity.Retrying(wait=tenacity.wait_random_exponential(multiplier=0.05, max=5.0))

# The failures a watch resumes from; every other one is raised.
_RESUMABLE_REASONS = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: frozenset({"WATCHER_TOO_SLOW", "TOO_MANY_WATCHERS"}),
}

_T = TypeVar("_T")


class FlowsessionError(Exception):
    """A failed RPC with the server's google.rpc error details unpacked."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        field_violations: list[tuple[str, str]] | None = None,
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" ({reason})" if reason else ""))
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}
        self.field_violations = field_violations or []
        self.retry_delay = retry_delay

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> FlowsessionError:
        """Builds the error from a grpc.RpcError that is also a grpc.Call (real or grpc_testing)."""
        code: grpc.StatusCode = err.code()
        message: str = err.details() or ""
        try:
            status = rpc_status.from_call(err)
        except ValueError:
            # The rich status disagrees with the call's code or message (e.g. a proxy rewrote the
            # status); trust the call's own status rather than mask the error.
            status = None
        reason = ""
        metadata: dict[str, str] = {}
        field_violations: list[tuple[str, str]] = []
        retry_delay: float | None = None
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                field_violations = [(v.field, v.description) for v in bad_request.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_delay = retry.retry_delay.ToTimedelta().total_seconds()
        error_cls: type[FlowsessionError] = cls
        if cls is FlowsessionError and code is grpc.StatusCode.OUT_OF_RANGE and reason == "CURSOR_EXPIRED":
            error_cls = CursorExpiredError
        return error_cls(
            code,
            message,
            reason=reason,
            metadata=metadata,
            field_violations=field_violations,
            retry_delay=retry_delay,
        )


class CursorExpiredError(FlowsessionError):
    """OUT_OF_RANGE, reason CURSOR_EXPIRED: the events after the resume position are gone (pruned), or
    the cursor is not this database's (another database, or one restored from a backup). Re-read the state with ListSessions/GetSession and watch
    again from now; resuming cannot be gapless."""

    @property
    def oldest_cursor(self) -> str:
        """The oldest cursor the server still has (WatchSessions); "" when it sent none."""
        return self.metadata.get("oldest_cursor", "")

    @property
    def oldest_version(self) -> int | None:
        """The session's oldest version still in its history (WatchSession); None when it sent none."""
        value = self.metadata.get("oldest_version", "")
        return int(value) if value.isdigit() else None


def _resumable(error: FlowsessionError) -> bool:
    return error.code is grpc.StatusCode.UNAVAILABLE or error.reason in _RESUMABLE_REASONS.get(error.code, ())


def _backoff(attempt: int) -> float:
    """tenacity's wait for the attempt-th consecutive re-open (1-based)."""
    state = tenacity.RetryCallState(_RECONNECT, fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    return float(_RECONNECT.wait(state))


def _delay(error: FlowsessionError, attempt: int) -> float:
    """The wait before the attempt-th consecutive re-open: the server's RetryInfo delay plus up to a
    quarter more (streams a server ended together, say at shutdown, do not all return at one
    instant), else the jittered exponential backoff."""
    if error.retry_delay is not None:
        return error.retry_delay * random.uniform(1.0, 1.25)
    return _backoff(attempt)


_TERMINAL_EVENTS = frozenset(
    {
        session_pb2.SESSION_EVENT_TYPE_COMPLETED,
        session_pb2.SESSION_EVENT_TYPE_ABORTED,
        session_pb2.SESSION_EVENT_TYPE_EXPIRED,
        session_pb2.SESSION_EVENT_TYPE_ERROR,
    }
)
_RUNNING = session_pb2.SESSION_STATUS_RUNNING
# The GetSession that tells whether a WatchSession stream ended with nothing sent because the watch is
# over, when the watch itself has no timeout.
CHECK_TIMEOUT_S = 10.0


def _not_after(cursor: str, last: str) -> bool:
    """True when cursor is known to be at or before last: both "<epoch>-<hex>[-<tag>]" of the same
    epoch. Cursors of different epochs (or not in that form) are not comparable, so never "not after"."""
    epoch, _, rest = cursor.partition("-")
    last_epoch, _, last_rest = last.partition("-")
    if not epoch or epoch != last_epoch:
        return False
    try:
        return int(rest.split("-")[0], 16) <= int(last_rest.split("-")[0], 16)
    except ValueError:
        return False


class Client:
    """The generated stubs on one channel, plus watch() and watch_sessions() with auto-resume."""

    def __init__(self, channel: grpc.Channel, *, sleep: Callable[[float], object] | None = None) -> None:
        self._channel = channel
        self._closed = threading.Event()
        # Injected so tests can check a server's RetryInfo delay without waiting it out. The default
        # wait ends early when close() is called from another thread.
        self._sleep = sleep or self._closed.wait
        self.flows = flow_service_pb2_grpc.FlowServiceStub(channel)
        self.sessions = session_service_pb2_grpc.SessionServiceStub(channel)

    def close(self) -> None:
        """Closes the channel. Watches of this client, also ones waiting to reconnect in another
        thread, end with FlowsessionError(CANCELLED)."""
        self._closed.set()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def watch(
        self,
        environment: str,
        session_id: str,
        *,
        after_version: int = 0,
        timeout: float | None = None,
        max_reconnects: int | None = None,
    ) -> Iterator[session_pb2.SessionEvent]:
        """Yields the session's events in version order, each exactly once, until the terminal one.

        Heartbeats are consumed, not yielded. On UNAVAILABLE and on RESOURCE_EXHAUSTED
        (WATCHER_TOO_SLOW, TOO_MANY_WATCHERS) the stream is re-opened after the last version
        yielded (or the server's `last_version` when it names a later one, as a stream cut before
        its first event does), after the server's RetryInfo delay or else a jittered exponential
        backoff. A stream that ends with OK after a non-terminal event (the server never does; a
        proxy might) is re-opened the same way. The server ends at once, with nothing sent, when
        `after_version` is the terminal version: on such an end a GetSession (with `timeout`, else
        CHECK_TIMEOUT_S, whose expiry then re-opens the stream rather than raise) tells whether the
        session has ended at that version, which ends the iterator, or else the stream is re-opened.
        `timeout` applies to each stream attempt; every open waits for the connection
        (wait_for_ready), so without a timeout a server that never comes up blocks the iterator.
        `max_reconnects` caps consecutive re-opens with no new event or heartbeat in between (None:
        unlimited). Raises CursorExpiredError on CURSOR_EXPIRED
        (with .oldest_version), FlowsessionError for any other failure or when the cap is hit.
        """
        last_version = after_version
        ended = False  # the terminal event was received: the server's OK end is the end

        def open_stream() -> Any:
            return self.sessions.WatchSession(
                session_service_pb2.WatchSessionRequest(
                    environment=environment, session_id=session_id, after_version=last_version
                ),
                timeout=timeout,
                wait_for_ready=True,
            )

        def accept(
            response: session_service_pb2.WatchSessionResponse,
        ) -> tuple[bool, session_pb2.SessionEvent | None]:
            nonlocal last_version, ended
            if not response.HasField("event"):
                # A heartbeat: the stream is healthy. Its version never passes the last event sent.
                return True, None
            event = response.event
            if event.version <= last_version:  # a re-opened stream may repeat the boundary event
                return False, None
            last_version = event.version
            ended = event.type in _TERMINAL_EVENTS
            return True, event

        def finished(received: bool) -> bool:
            # The server ends with OK at once (nothing sent) when after_version already is the terminal
            # version (after the terminal event the watch has returned already). An OK end with nothing
            # sent from anything else (a proxy closing an idle stream) must not end the watch: the
            # session tells which.
            if ended or received:
                return ended
            try:
                session = self._invoke(
                    lambda: self.sessions.GetSession(
                        session_service_pb2.GetSessionRequest(environment=environment, session_id=session_id),
                        timeout=CHECK_TIMEOUT_S if timeout is None else timeout,
                    )
                ).session
            except grpc.RpcError as err:
                # The check's own deadline (the watch has none) says nothing the caller asked for: re-open,
                # as after any early end (the stream ends at once again if the watch is over).
                if timeout is None and err.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                    return False
                raise
            return session.status != _RUNNING and session.version == last_version

        def adopt(error: FlowsessionError) -> None:
            nonlocal last_version
            # The server names the last version it handed over, all received before this status: it
            # is ahead of ours only for a stream cut before its first event (the version before it).
            theirs = error.metadata.get("last_version", "")
            if theirs.isdigit() and int(theirs) > last_version:
                last_version = int(theirs)

        return self._follow(open_stream, accept, adopt, max_reconnects, finished=finished, done=lambda: ended)

    def watch_sessions(
        self,
        environment: str,
        *,
        flow_id: str = "",
        statuses: Iterable[session_pb2.SessionStatus] = (),
        after_cursor: str = "",
        include_current: bool = False,
        timeout: float | None = None,
        max_reconnects: int | None = None,
        heartbeats: bool = False,
    ) -> Iterator[session_pb2.SessionEvent | session_service_pb2.WatchHeartbeat]:
        """Yields every event of the environment's matching sessions in commit order, each once.

        Empty `after_cursor`: from now (with `include_current`, first the latest event of each
        matching RUNNING session); otherwise after that cursor. With `heartbeats`, the server's
        WatchHeartbeat messages are yielded too (their cursor is a safe position to store).

        The iterator remembers the last cursor it has seen, from events and heartbeats alike. On
        UNAVAILABLE and on RESOURCE_EXHAUSTED (WATCHER_TOO_SLOW, TOO_MANY_WATCHERS) it re-opens
        with after_cursor set to that cursor and include_current off, after the server's RetryInfo
        delay or else a jittered exponential backoff; events at or before that cursor are skipped.
        Before it has seen a cursor it takes the `last_cursor` the server's error names (SHUTTING_DOWN
        and WATCHER_TOO_SLOW carry the stream's position), else it re-sends the original request: with
        an empty `after_cursor` that starts "from now" again after a lost connection, so events
        committed between the two opens are missed; pass a cursor (e.g. from a previous run) where
        that matters. Every open waits for the connection (wait_for_ready). If a resume cuts into
        the include_current snapshot, the log is replayed from the last snapshot event: nothing is
        missed, older events of other sessions may appear (and CursorExpiredError is raised when
        that event is older than the retained history).

        `timeout` applies to each stream attempt (the server never ends the stream by itself, so a
        timeout ends it with DEADLINE_EXCEEDED, raised; an end with OK, say from a proxy, is
        resumed like UNAVAILABLE). `max_reconnects` caps consecutive re-opens
        with no new event or heartbeat in between (None: unlimited). Raises CursorExpiredError
        (with .oldest_cursor) on CURSOR_EXPIRED: re-read with ListSessions and watch from now.
        Raises FlowsessionError for any other failure or when the cap is hit.
        """
        original = session_service_pb2.WatchSessionsRequest(
            environment=environment,
            flow_id=flow_id,
            statuses=statuses,
            after_cursor=after_cursor,
            include_current=include_current,
        )
        last_cursor = after_cursor

        def open_stream() -> Any:
            request = original
            if last_cursor != after_cursor:
                request = session_service_pb2.WatchSessionsRequest()
                request.CopyFrom(original)
                request.after_cursor = last_cursor
                request.include_current = False
            return self.sessions.WatchSessions(request, timeout=timeout, wait_for_ready=True)

        def accept(
            response: session_service_pb2.WatchSessionsResponse,
        ) -> tuple[bool, session_pb2.SessionEvent | session_service_pb2.WatchHeartbeat | None]:
            nonlocal last_cursor
            if not response.HasField("event"):
                heartbeat = response.heartbeat
                # A heartbeat travels behind every event sent before it, so its cursor is safe to
                # resume from; "" (an older server's, before anything was committed) or an older
                # cursor moves nothing.
                if heartbeat.cursor and not _not_after(heartbeat.cursor, last_cursor):
                    last_cursor = heartbeat.cursor
                return True, heartbeat if heartbeats else None
            event = response.event
            # The server sends nothing at or before the resume cursor; skipped defensively.
            if last_cursor and _not_after(event.cursor, last_cursor):
                return False, None
            if event.cursor:
                last_cursor = event.cursor
            return True, event

        def adopt(error: FlowsessionError) -> None:
            nonlocal last_cursor
            theirs = error.metadata.get("last_cursor", "")
            if theirs and (not last_cursor or _not_after(last_cursor, theirs)):
                last_cursor = theirs

        # The server never ends a WatchSessions stream by itself: an OK end is a break to resume from.
        return self._follow(open_stream, accept, adopt, max_reconnects, finished=lambda received: False)

    def _follow(
        self,
        open_stream: Callable[[], Any],
        accept: Callable[[Any], tuple[bool, _T | None]],
        adopt: Callable[[FlowsessionError], None],
        max_reconnects: int | None,
        *,
        finished: Callable[[bool], bool],
        done: Callable[[], bool] = lambda: False,
    ) -> Iterator[_T]:
        """The resume loop of both watches. open_stream opens a call at the current position;
        accept records a response's position and returns (progress, item to yield or None); adopt
        takes the position a resumable error names; finished(whether the attempt received anything)
        tells an OK end that ends the watch from one to resume after; done() true after an item (the
        terminal event) ends the watch there, without waiting for the stream's end: a break between
        the two must not re-open a watch that is over."""
        attempts = 0  # consecutive re-opens without progress: the cap's count and the backoff's exponent
        while True:
            # wait_for_ready (set by open_stream): while the connection is down a re-open waits for
            # it, paced by gRPC's jittered exponential connection backoff.
            call = self._invoke(open_stream)
            received = False
            try:
                for response in call:
                    received = True
                    progress, item = accept(response)
                    if progress:
                        attempts = 0
                    if item is not None:
                        yield item
                    if done():
                        return
                if finished(received):
                    return
                error, cause = FlowsessionError(grpc.StatusCode.UNAVAILABLE, "the stream ended early with OK"), None
            except grpc.RpcError as err:
                error, cause = FlowsessionError.from_rpc_error(err), err
            finally:
                # Frees the server's watcher when the caller stops iterating early; a no-op on a
                # stream that already ended.
                call.cancel()
            if not _resumable(error) or (max_reconnects is not None and attempts >= max_reconnects):
                raise error from cause
            adopt(error)
            attempts += 1
            self._sleep(_delay(error, attempts))
            if self._closed.is_set():
                raise _closed_error() from cause

    def _invoke(self, call: Callable[[], Any]) -> Any:
        """Starts a call on the channel, or raises the closed error once close() has run."""
        if self._closed.is_set():
            raise _closed_error()
        try:
            return call()
        except ValueError:  # grpc's "Cannot invoke RPC on closed channel!": close() won a race
            if self._closed.is_set():
                raise _closed_error() from None
            raise


def _closed_error() -> FlowsessionError:
    return FlowsessionError(grpc.StatusCode.CANCELLED, "the client was closed")


def connect(address: str, *, options: Sequence[tuple[str, object]] = ()) -> Client:
    """Opens an insecure channel to address with the keepalive defaults; an option in `options`
    replaces the default of the same name (gRPC would take the first of two). A keepalive_timeout_ms
    of yours also sets the ping ack timeout gRPC applies (grpc.http2.ping_timeout_ms), unless you
    pass that too."""
    merged = {**dict(KEEPALIVE_OPTIONS), **dict(options)}
    if _KEEPALIVE_TIMEOUT in dict(options) and _PING_TIMEOUT not in dict(options):
        merged[_PING_TIMEOUT] = merged[_KEEPALIVE_TIMEOUT]
    return Client(grpc.insecure_channel(address, options=list(merged.items())))
