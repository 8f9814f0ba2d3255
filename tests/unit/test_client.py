"""The client facade against grpcio-testing's fake channel: resume, dedup, backoff, rich errors.

The facade's watch() / watch_sessions() runs in a thread; the test thread plays the server through
the fake channel. Every wait in the test thread has a deadline (DEADLINE), so a broken facade fails
instead of hanging. The facade's sleep is injected (recorded, never slept).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import grpc_testing
import pytest
import tenacity
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from flowsession import client as client_module
from flowsession.client import KEEPALIVE_OPTIONS, Client, CursorExpiredError, FlowsessionError, connect
from flowsession.v1 import session_pb2, session_service_pb2

DEADLINE = 5.0
SERVICE = session_service_pb2.DESCRIPTOR.services_by_name["SessionService"]
WATCH = SERVICE.methods_by_name["WatchSession"]
WATCH_SESSIONS = SERVICE.methods_by_name["WatchSessions"]
GET_SESSION = SERVICE.methods_by_name["GetSession"]
END = object()  # what the watch thread reports when the iterator is exhausted


class RecordingChannel:
    """The fake channel, adapted to the facade's call signature.

    grpc_testing's multi-callables accept only (request, timeout, metadata, credentials): the
    wait_for_ready=True the facade passes would be a TypeError. This wrapper records each call's
    request and keyword arguments, drops wait_for_ready and forwards the rest.
    """

    def __init__(self, fake: grpc_testing.Channel) -> None:
        self._fake = fake
        self.calls: list[tuple[Message, dict[str, Any]]] = []

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        invoke = self._fake.unary_stream(method, *args, **kwargs)

        def call(request: Message, **call_kwargs: Any) -> Any:
            self.calls.append((request, call_kwargs))
            call_kwargs = {k: v for k, v in call_kwargs.items() if k != "wait_for_ready"}
            return invoke(request, **call_kwargs)

        return call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fake, name)


@pytest.fixture
def fake() -> grpc_testing.Channel:
    return grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())


@pytest.fixture
def channel(fake: grpc_testing.Channel) -> RecordingChannel:
    return RecordingChannel(fake)


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(channel: RecordingChannel, sleeps: list[float]) -> Client:
    return Client(channel, sleep=sleeps.append)  # type: ignore[arg-type]


def within_deadline(fn: Callable[[], Any]) -> Any:
    """Runs a blocking grpc_testing call (they take no timeout) with DEADLINE."""
    box: queue.Queue[Any] = queue.Queue()
    threading.Thread(target=lambda: box.put(fn()), daemon=True).start()
    return box.get(timeout=DEADLINE)


def take_watch(fake: grpc_testing.Channel) -> tuple[session_service_pb2.WatchSessionRequest, Any]:
    _, request, rpc = within_deadline(lambda: fake.take_unary_stream(WATCH))
    return request, rpc


def take_watch_sessions(fake: grpc_testing.Channel) -> tuple[session_service_pb2.WatchSessionsRequest, Any]:
    _, request, rpc = within_deadline(lambda: fake.take_unary_stream(WATCH_SESSIONS))
    return request, rpc


class Consumer:
    """Consumes an iterator in a thread, reporting each item, then END or the exception."""

    def __init__(self, items: Callable[[], Iterator[Any]]) -> None:
        self._items: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True)
        self._thread.start()

    def _run(self, items: Callable[[], Iterator[Any]]) -> None:
        try:
            for item in items():
                self._items.put(item)
            self._items.put(END)
        except BaseException as exc:  # handed to the test thread to assert on
            self._items.put(exc)

    def next(self) -> Any:
        return self._items.get(timeout=DEADLINE)

    def next_version(self) -> int:
        item = self.next()
        assert isinstance(item, session_pb2.SessionEvent), item
        return item.version

    def next_cursor(self) -> str:
        item = self.next()
        assert isinstance(item, session_pb2.SessionEvent), item
        return item.cursor

    def error(self) -> FlowsessionError:
        item = self.next()
        assert isinstance(item, FlowsessionError), item
        self._thread.join(timeout=DEADLINE)
        return item

    def ends(self) -> None:
        assert self.next() is END
        self._thread.join(timeout=DEADLINE)
        assert not self._thread.is_alive()


class Watcher(Consumer):
    """client.watch("live", "s-1", **kwargs) in a thread."""

    def __init__(self, client: Client, **kwargs: Any) -> None:
        super().__init__(lambda: client.watch("live", "s-1", **kwargs))


class SessionsWatcher(Consumer):
    """client.watch_sessions("live", **kwargs) in a thread."""

    def __init__(self, client: Client, **kwargs: Any) -> None:
        super().__init__(lambda: client.watch_sessions("live", **kwargs))

    def timed_out(self) -> None:
        """The iterator ended the way a WatchSessions iteration ends: the caller's deadline passed."""
        assert self.error().code is grpc.StatusCode.DEADLINE_EXCEEDED

    def resumes_after_ok(self, fake: grpc_testing.Channel) -> None:
        """The stream ended with OK: the iterator re-opens (WatchSessions never ends by itself); the
        re-opened stream then ends the iteration the usual way, with the caller's deadline."""
        _, rpc = take_watch_sessions(fake)
        rpc.terminate((), grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        assert self.error().code is grpc.StatusCode.DEADLINE_EXCEEDED


def event(version: int, kind: int = session_pb2.SESSION_EVENT_TYPE_STEP_COMPLETED) -> Any:
    return session_service_pb2.WatchSessionResponse(
        event=session_pb2.SessionEvent(
            version=version,
            type=kind,
            cursor=f"c{version}",
            session=session_pb2.Session(session_id="s-1", version=version),
        )
    )


def heartbeat(version: int) -> Any:
    return session_service_pb2.WatchSessionResponse(
        heartbeat=session_service_pb2.WatchHeartbeat(version=version)
    )


def cursor(position: int, epoch: str = "e1") -> str:
    # The server's format: "<epoch>-<16 hex digits>-<tag>"; the tag names the event (any 8 hex digits here).
    return f"{epoch}-{position:016x}-{position * 7919 % 2**32:08x}"


def times_out(rpc: Any) -> None:
    """Ends a stream with DEADLINE_EXCEEDED. The fake drops responses not yet read when a call ends
    non-OK, so every response sent must have been read first."""
    rpc.terminate((), grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")


def feed_event(position: int, session_id: str = "s-1", epoch: str = "e1") -> Any:
    return session_service_pb2.WatchSessionsResponse(
        event=session_pb2.SessionEvent(
            version=1,
            cursor=cursor(position, epoch),
            type=session_pb2.SESSION_EVENT_TYPE_STEP_COMPLETED,
            session=session_pb2.Session(session_id=session_id, version=1),
        )
    )


def feed_heartbeat(position: int) -> Any:
    return session_service_pb2.WatchSessionsResponse(
        heartbeat=session_service_pb2.WatchHeartbeat(cursor=cursor(position))
    )


def rich_status(code: grpc.StatusCode, message: str, *details: Message) -> grpc.Status:
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=packed))


def terminate_with(rpc: Any, status: grpc.Status) -> None:
    rpc.terminate(status.trailing_metadata, status.code, status.details)


def unavailable(rpc: Any) -> None:
    # What a real channel reports when the connection drops: no rich status.
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "Socket closed")


def error_info(
    code: grpc.StatusCode, reason: str, retry_after: float | None = None, **metadata: str
) -> grpc.Status:
    details: list[Message] = [
        error_details_pb2.ErrorInfo(reason=reason, domain="flowsession", metadata=metadata)
    ]
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(retry_after * 1000))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    return rich_status(code, f"{reason.lower()} happened", *details)


def reopened_then_ended(
    fake: grpc_testing.Channel, watcher: Watcher, after_version: int, end: int = session_pb2.SESSION_EVENT_TYPE_COMPLETED
) -> None:
    """The next WatchSession asks after ``after_version``, gets the terminal event, and the watch ends."""
    request, rpc = take_watch(fake)
    assert request.after_version == after_version
    rpc.send_response(event(after_version + 1, end))
    rpc.terminate((), grpc.StatusCode.OK, "")
    assert watcher.next_version() == after_version + 1
    watcher.ends()


def after_versions(channel: RecordingChannel) -> list[int]:
    return [request.after_version for request, _ in channel.calls]


def after_cursors(channel: RecordingChannel) -> list[str]:
    return [request.after_cursor for request, _ in channel.calls]


def first_window(sleeps: list[float]) -> bool:
    """One backoff sleep, of the first attempt: full jitter in [0, 50 ms]."""
    return len(sleeps) == 1 and 0 <= sleeps[0] <= 0.05


def test_events_are_yielded_in_order_and_the_ok_end_ends_the_iterator(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    watcher = Watcher(client, timeout=30)
    request, rpc = take_watch(fake)
    assert (request.environment, request.session_id, request.after_version) == ("live", "s-1", 0)
    for version in (1, 2):
        rpc.send_response(event(version))
    rpc.send_response(event(3, session_pb2.SESSION_EVENT_TYPE_COMPLETED))
    rpc.terminate((), grpc.StatusCode.OK, "")

    first = watcher.next()
    assert isinstance(first, session_pb2.SessionEvent)
    assert (first.version, first.cursor, first.session.session_id) == (1, "c1", "s-1")
    assert [watcher.next_version(), watcher.next_version()] == [2, 3]
    watcher.ends()
    assert channel.calls[0][1] == {"timeout": 30, "wait_for_ready": True}
    assert len(channel.calls) == 1  # OK is the end, not a reason to re-open


def test_unavailable_resumes_after_the_last_yielded_version_and_skips_duplicates(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel, sleeps: list[float]
) -> None:
    watcher = Watcher(client)
    _, rpc = take_watch(fake)
    rpc.send_response(event(1))
    rpc.send_response(event(2))
    # The fake drops responses still buffered when a call ends non-OK (a real channel delivers
    # them first), so the break comes only after both events reached the caller.
    assert [watcher.next_version(), watcher.next_version()] == [1, 2]
    unavailable(rpc)

    request, rpc = take_watch(fake)
    assert request.after_version == 2
    rpc.send_response(event(2))  # a server may repeat the boundary event
    rpc.send_response(event(3, session_pb2.SESSION_EVENT_TYPE_COMPLETED))
    rpc.terminate((), grpc.StatusCode.OK, "")

    assert watcher.next_version() == 3
    watcher.ends()
    assert after_versions(channel) == [0, 2]
    assert all(kwargs["wait_for_ready"] is True for _, kwargs in channel.calls)
    assert first_window(sleeps)  # no RetryInfo: the first attempt of the jittered backoff


def test_resume_before_any_event_uses_the_original_after_version(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    watcher = Watcher(client, after_version=7)
    request, rpc = take_watch(fake)
    assert request.after_version == 7
    unavailable(rpc)
    reopened_then_ended(fake, watcher, 7, session_pb2.SESSION_EVENT_TYPE_ABORTED)


def test_a_stream_cut_before_its_first_event_resumes_from_the_servers_last_version(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    # after_version 0 asks for the current state; the server cut the stream (shutting down) after
    # settling on version 4 as the start: reopening "from 0" again would skip what came in between.
    watcher = Watcher(client)
    _, rpc = take_watch(fake)
    terminate_with(rpc, error_info(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", 1.0, last_version="4"))

    request, rpc = take_watch(fake)
    assert request.after_version == 4
    rpc.send_response(event(5))
    rpc.send_response(event(6, session_pb2.SESSION_EVENT_TYPE_EXPIRED))
    rpc.terminate((), grpc.StatusCode.OK, "")
    assert [watcher.next_version(), watcher.next_version()] == [5, 6]
    watcher.ends()


def test_a_servers_last_version_behind_the_last_yielded_one_moves_nothing(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    watcher = Watcher(client)
    _, rpc = take_watch(fake)
    rpc.send_response(event(3))
    assert watcher.next_version() == 3
    terminate_with(rpc, error_info(grpc.StatusCode.RESOURCE_EXHAUSTED, "WATCHER_TOO_SLOW", last_version="2"))

    request, rpc = take_watch(fake)
    assert request.after_version == 3
    times_out(rpc)
    assert watcher.error().code is grpc.StatusCode.DEADLINE_EXCEEDED


def test_an_ok_end_after_a_non_terminal_event_resumes_after_it(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel, sleeps: list[float]
) -> None:
    # The server ends WatchSession with OK only after the terminal event; an earlier OK end (a proxy
    # closing the stream) once ended the iterator silently, the session still RUNNING.
    watcher = Watcher(client)
    _, rpc = take_watch(fake)
    rpc.send_response(event(2))
    rpc.terminate((), grpc.StatusCode.OK, "")
    assert watcher.next_version() == 2

    request, rpc = take_watch(fake)
    assert request.after_version == 2
    assert first_window(sleeps)
    rpc.send_response(event(3, session_pb2.SESSION_EVENT_TYPE_COMPLETED))
    rpc.terminate((), grpc.StatusCode.OK, "")
    assert watcher.next_version() == 3
    watcher.ends()
    assert after_versions(channel) == [0, 2]


def test_a_break_after_the_terminal_event_ends_the_watch_without_reopening(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    # The terminal event is the end; the OK status after it only confirms it. A connection lost between
    # the two re-opened the stream: with the server gone the iterator then blocked (wait_for_ready) or
    # raised UNAVAILABLE after it had yielded the terminal event.
    watcher = Watcher(client, max_reconnects=0)
    _, rpc = take_watch(fake)
    rpc.send_response(event(2))
    rpc.send_response(event(3, session_pb2.SESSION_EVENT_TYPE_ABORTED))
    assert [watcher.next_version(), watcher.next_version()] == [2, 3]
    unavailable(rpc)
    watcher.ends()
    assert len(channel.calls) == 1


def ended_with_nothing_sent(client: Client, fake: grpc_testing.Channel, after_version: int) -> Watcher:
    """A watch whose first stream ends with OK before sending anything."""
    watcher = Watcher(client, after_version=after_version)
    _, rpc = take_watch(fake)
    rpc.terminate((), grpc.StatusCode.OK, "")
    return watcher


def answer_get_session(fake: grpc_testing.Channel, status: int, version: int) -> session_service_pb2.GetSessionRequest:
    _, request, rpc = within_deadline(lambda: fake.take_unary_unary(GET_SESSION))
    session = session_pb2.Session(session_id="s-1", status=status, version=version)  # type: ignore[arg-type]
    rpc.terminate(session_service_pb2.GetSessionResponse(session=session), (), grpc.StatusCode.OK, "")
    return request


def test_an_ok_end_with_nothing_sent_ends_the_iterator_once_the_session_has_ended_there(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    # What the server answers when after_version already is the session's terminal version.
    watcher = ended_with_nothing_sent(client, fake, after_version=5)
    request = answer_get_session(fake, session_pb2.SESSION_STATUS_ABORTED, 5)
    assert (request.environment, request.session_id) == ("live", "s-1")
    watcher.ends()
    assert after_versions(channel) == [5]


def test_an_ok_end_with_nothing_sent_on_a_running_session_resumes(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    # A proxy closing an idle stream before its first heartbeat once ended the iterator silently.
    watcher = ended_with_nothing_sent(client, fake, after_version=5)
    answer_get_session(fake, session_pb2.SESSION_STATUS_RUNNING, 5)
    reopened_then_ended(fake, watcher, 5)
    assert after_versions(channel) == [5, 5]


def test_a_close_that_wins_the_race_to_the_get_session_ends_the_watch_cancelled(fake: grpc_testing.Channel) -> None:
    # close() from another thread between the stream's OK end and the GetSession that checks it: grpc
    # refuses a call on a closed channel with ValueError, which escaped the iterator raw.
    class Channel(RecordingChannel):
        client: Client

        def close(self) -> None:
            pass

        def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Callable[..., Any]:
            def call(request: Message, **call_kwargs: Any) -> Any:
                self.client.close()  # close() won the race
                raise ValueError("Cannot invoke RPC on closed channel!")

            return call

    channel = Channel(fake)
    client = channel.client = Client(channel)  # type: ignore[arg-type]
    watcher = ended_with_nothing_sent(client, fake, after_version=5)
    error = watcher.error()
    assert (error.code, error.message) == (grpc.StatusCode.CANCELLED, "the client was closed")


def test_a_deadline_of_the_check_does_not_end_a_watch_without_a_timeout(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    # The GetSession after an OK end with nothing sent has its own deadline (CHECK_TIMEOUT_S) when the
    # watch has none: a server slow to answer it made a watch without a timeout raise DEADLINE_EXCEEDED.
    watcher = ended_with_nothing_sent(client, fake, after_version=5)
    _, _, get = within_deadline(lambda: fake.take_unary_unary(GET_SESSION))
    get.terminate(session_service_pb2.GetSessionResponse(), (), grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    reopened_then_ended(fake, watcher, 5)  # as after any early end
    assert after_versions(channel) == [5, 5]


def test_retry_info_delay_is_slept_before_reconnecting(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel, sleeps: list[float]
) -> None:
    watcher = Watcher(client)
    _, rpc = take_watch(fake)
    terminate_with(
        rpc,
        rich_status(
            grpc.StatusCode.UNAVAILABLE,
            "server shutting down",
            error_details_pb2.ErrorInfo(reason="SHUTTING_DOWN", domain="flowsession"),
            error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1, nanos=500_000_000)),
        ),
    )

    _, rpc = take_watch(fake)
    # take_watch returning means the second call was made, so the sleep before it has happened:
    # the server's delay, plus up to a quarter so streams ended together do not all return at once.
    assert len(sleeps) == 1 and 1.5 <= sleeps[0] <= 1.875
    rpc.send_response(event(2, session_pb2.SESSION_EVENT_TYPE_COMPLETED))
    rpc.terminate((), grpc.StatusCode.OK, "")
    assert watcher.next_version() == 2
    watcher.ends()


def test_not_found_raises_with_error_info(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    watcher = Watcher(client)
    _, rpc = take_watch(fake)
    terminate_with(
        rpc,
        rich_status(
            grpc.StatusCode.NOT_FOUND,
            "session s-1 not found",
            error_details_pb2.ErrorInfo(
                reason="SESSION_NOT_FOUND", domain="flowsession", metadata={"session_id": "s-1"}
            ),
        ),
    )

    error = watcher.error()
    assert error.code is grpc.StatusCode.NOT_FOUND
    assert error.message == "session s-1 not found"
    assert error.reason == "SESSION_NOT_FOUND"
    assert error.metadata == {"session_id": "s-1"}
    assert (error.field_violations, error.retry_delay) == ([], None)
    assert isinstance(error.__cause__, grpc.RpcError)
    assert len(channel.calls) == 1  # only UNAVAILABLE re-opens


def test_bad_request_field_violations_are_parsed(client: Client, fake: grpc_testing.Channel) -> None:
    watcher = Watcher(client)
    _, rpc = take_watch(fake)
    terminate_with(
        rpc,
        rich_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid request",
            error_details_pb2.ErrorInfo(reason="INVALID_FIELD", domain="flowsession"),
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field="session_id", description="required"),
                    error_details_pb2.BadRequest.FieldViolation(field="environment", description="unknown"),
                ]
            ),
        ),
    )

    error = watcher.error()
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_FIELD"
    assert error.field_violations == [("session_id", "required"), ("environment", "unknown")]


def test_error_without_rich_status_keeps_code_and_message(client: Client, fake: grpc_testing.Channel) -> None:
    watcher = Watcher(client)
    _, rpc = take_watch(fake)
    rpc.terminate((), grpc.StatusCode.PERMISSION_DENIED, "no access")

    error = watcher.error()
    assert (error.code, error.message) == (grpc.StatusCode.PERMISSION_DENIED, "no access")
    assert (error.reason, error.metadata, error.field_violations, error.retry_delay) == ("", {}, [], None)


def test_rich_status_that_contradicts_the_call_is_ignored(client: Client, fake: grpc_testing.Channel) -> None:
    # from_call raises ValueError when code/message disagree; the error must still carry the call's status.
    watcher = Watcher(client)
    _, rpc = take_watch(fake)
    status = rich_status(
        grpc.StatusCode.NOT_FOUND, "original", error_details_pb2.ErrorInfo(reason="SESSION_NOT_FOUND")
    )
    rpc.terminate(status.trailing_metadata, grpc.StatusCode.INTERNAL, "rewritten by a proxy")

    error = watcher.error()
    assert (error.code, error.message, error.reason) == (grpc.StatusCode.INTERNAL, "rewritten by a proxy", "")


def test_max_reconnects_caps_consecutive_reconnects_without_progress(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    watcher = Watcher(client, max_reconnects=2)
    for _ in range(3):
        _, rpc = take_watch(fake)
        unavailable(rpc)

    error = watcher.error()
    assert error.code is grpc.StatusCode.UNAVAILABLE
    assert error.message == "Socket closed"
    assert isinstance(error.__cause__, grpc.RpcError)
    assert len(channel.calls) == 3  # the first call and exactly two reconnects


def test_a_new_event_resets_the_reconnect_count_but_a_duplicate_does_not(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    watcher = Watcher(client, max_reconnects=1)
    _, rpc = take_watch(fake)
    rpc.send_response(event(1))
    assert watcher.next_version() == 1
    unavailable(rpc)

    _, rpc = take_watch(fake)  # reconnect 1 of 1
    rpc.send_response(event(2))
    assert watcher.next_version() == 2
    unavailable(rpc)

    _, rpc = take_watch(fake)  # allowed again: version 2 was progress
    rpc.send_response(event(2))  # a repeat only: no progress
    unavailable(rpc)

    error = watcher.error()
    assert error.code is grpc.StatusCode.UNAVAILABLE
    assert after_versions(channel) == [0, 1, 2]


def test_closing_the_iterator_cancels_the_stream(client: Client, fake: grpc_testing.Channel) -> None:
    events = client.watch("live", "s-1")
    first = queue.Queue[Any]()
    threading.Thread(target=lambda: first.put(next(events)), daemon=True).start()
    _, rpc = take_watch(fake)
    rpc.send_response(event(1))
    assert first.get(timeout=DEADLINE).version == 1

    events.close()
    within_deadline(rpc.cancelled)  # returns once the call ended CANCELLED, raises otherwise


def test_closing_the_client_ends_a_watch_waiting_to_reconnect(fake: grpc_testing.Channel) -> None:
    class Channel(RecordingChannel):
        def close(self) -> None:
            pass

    channel = Channel(fake)
    client = Client(channel)  # type: ignore[arg-type]  # the real wait, not a recorded one
    watcher = Watcher(client)
    _, rpc = take_watch(fake)
    # A 60 s RetryInfo wait: only the close can end it within the test's deadline.
    terminate_with(rpc, error_info(grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WATCHERS", 60.0))
    client.close()
    error = watcher.error()
    assert (error.code, error.message) == (grpc.StatusCode.CANCELLED, "the client was closed")
    assert len(channel.calls) == 1


def test_client_closes_its_channel_as_a_context_manager() -> None:
    closed = threading.Event()

    class Channel(RecordingChannel):
        def close(self) -> None:
            closed.set()

    fake = grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())
    with Client(Channel(fake)) as c:  # type: ignore[arg-type]
        assert c.sessions is not None and c.flows is not None
        assert not closed.is_set()
    assert closed.is_set()


def test_connect_opens_an_insecure_channel_with_keepalive_then_caller_options(
    monkeypatch: pytest.MonkeyPatch, fake: grpc_testing.Channel
) -> None:
    opened: list[tuple[str, list[tuple[str, object]]]] = []

    def insecure_channel(address: str, options: list[tuple[str, object]]) -> grpc_testing.Channel:
        opened.append((address, options))
        return fake

    monkeypatch.setattr(client_module.grpc, "insecure_channel", insecure_channel)
    extra = (("grpc.max_receive_message_length", 8 << 20),)
    with connect("localhost:50051", options=extra) as c:
        assert isinstance(c, Client)
    assert opened == [("localhost:50051", [*KEEPALIVE_OPTIONS, *extra])]

    # gRPC takes the first of two same-named options, so a caller's own keepalive must replace the
    # default rather than follow it (it was silently ignored).
    opened.clear()
    with connect("localhost:50051", options=[("grpc.keepalive_time_ms", 5_000)]):
        pass
    (_, options), = opened
    assert [value for name, value in options if name == "grpc.keepalive_time_ms"] == [5_000]
    assert len(options) == len(KEEPALIVE_OPTIONS)
    assert dict(KEEPALIVE_OPTIONS) == {
        "grpc.keepalive_time_ms": 60_000,
        "grpc.keepalive_timeout_ms": 20_000,
        "grpc.http2.ping_timeout_ms": 20_000,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.http2.max_pings_without_data": 0,
    }

    # gRPC waits grpc.http2.ping_timeout_ms for a keepalive ack: a caller's keepalive_timeout_ms
    # carries over to it, unless the caller sets both.
    opened.clear()
    with connect("localhost:50051", options=[("grpc.keepalive_timeout_ms", 5_000)]):
        pass
    (_, options), = opened
    assert (dict(options)["grpc.keepalive_timeout_ms"], dict(options)["grpc.http2.ping_timeout_ms"]) == (5_000, 5_000)
    opened.clear()
    with connect("localhost:50051", options=[("grpc.keepalive_timeout_ms", 5_000), ("grpc.http2.ping_timeout_ms", 7_000)]):
        pass
    (_, options), = opened
    assert dict(options)["grpc.http2.ping_timeout_ms"] == 7_000


# --- watch(): heartbeats and WATCHER_TOO_SLOW ------------------------------------------------------


def test_watch_consumes_heartbeats_without_yielding_them(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    watcher = Watcher(client)
    _, rpc = take_watch(fake)
    rpc.send_response(event(1))
    rpc.send_response(heartbeat(1))
    rpc.send_response(event(2, session_pb2.SESSION_EVENT_TYPE_COMPLETED))
    rpc.terminate((), grpc.StatusCode.OK, "")

    assert [watcher.next_version(), watcher.next_version()] == [1, 2]
    watcher.ends()
    assert len(channel.calls) == 1


def test_watch_resumes_after_watcher_too_slow_from_the_last_yielded_version(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel, sleeps: list[float]
) -> None:
    watcher = Watcher(client)
    _, rpc = take_watch(fake)
    rpc.send_response(event(1))
    rpc.send_response(event(2))
    assert [watcher.next_version(), watcher.next_version()] == [1, 2]
    terminate_with(rpc, error_info(grpc.StatusCode.RESOURCE_EXHAUSTED, "WATCHER_TOO_SLOW", last_version="2"))

    request, rpc = take_watch(fake)
    assert request.after_version == 2
    rpc.send_response(event(3, session_pb2.SESSION_EVENT_TYPE_COMPLETED))
    rpc.terminate((), grpc.StatusCode.OK, "")
    assert watcher.next_version() == 3
    watcher.ends()
    assert after_versions(channel) == [0, 2]
    assert first_window(sleeps)


def test_watch_heartbeat_counts_as_progress_for_max_reconnects(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    # A heartbeat proves the re-opened stream worked: the cap is on consecutive failed opens.
    watcher = Watcher(client, max_reconnects=1)
    _, rpc = take_watch(fake)
    unavailable(rpc)

    _, rpc = take_watch(fake)  # reconnect 1 of 1
    rpc.send_response(heartbeat(0))
    rpc.send_response(event(1))  # only a way to know the heartbeat was read before the break
    assert watcher.next_version() == 1
    unavailable(rpc)

    _, rpc = take_watch(fake)  # allowed again
    unavailable(rpc)
    assert watcher.error().code is grpc.StatusCode.UNAVAILABLE
    assert after_versions(channel) == [0, 0, 1]


def test_watch_resource_exhausted_with_another_reason_raises(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    watcher = Watcher(client)
    _, rpc = take_watch(fake)
    rpc.terminate((), grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max")
    error = watcher.error()
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "")
    assert len(channel.calls) == 1


def test_watch_cursor_expired_raises_the_typed_error(client: Client, fake: grpc_testing.Channel) -> None:
    watcher = Watcher(client, after_version=3)
    _, rpc = take_watch(fake)
    terminate_with(rpc, error_info(grpc.StatusCode.OUT_OF_RANGE, "CURSOR_EXPIRED", oldest_version="9"))
    error = watcher.error()
    assert isinstance(error, CursorExpiredError)
    assert (error.oldest_cursor, error.oldest_version, error.metadata) == ("", 9, {"oldest_version": "9"})


# --- watch_sessions() ------------------------------------------------------------------------------


def test_watch_sessions_sends_the_request_and_does_not_yield_heartbeats_by_default(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    watcher = SessionsWatcher(
        client,
        flow_id="kyc",
        statuses=[session_pb2.SESSION_STATUS_RUNNING],
        after_cursor=cursor(4),
        timeout=30,
    )
    request, rpc = take_watch_sessions(fake)
    assert request == session_service_pb2.WatchSessionsRequest(
        environment="live",
        flow_id="kyc",
        statuses=[session_pb2.SESSION_STATUS_RUNNING],
        after_cursor=cursor(4),
    )
    assert channel.calls[0][1] == {"timeout": 30, "wait_for_ready": True}
    rpc.send_response(feed_event(5))
    rpc.send_response(feed_heartbeat(5))
    rpc.send_response(feed_event(6, session_id="s-2"))
    rpc.terminate((), grpc.StatusCode.OK, "")

    first = watcher.next()
    assert isinstance(first, session_pb2.SessionEvent)
    assert (first.cursor, first.session.session_id) == (cursor(5), "s-1")
    assert watcher.next_cursor() == cursor(6)
    watcher.resumes_after_ok(fake)
    assert len(channel.calls) == 2


def test_watch_sessions_yields_heartbeats_when_asked(client: Client, fake: grpc_testing.Channel) -> None:
    watcher = SessionsWatcher(client, heartbeats=True)
    _, rpc = take_watch_sessions(fake)
    rpc.send_response(feed_event(1))
    rpc.send_response(feed_heartbeat(3))
    rpc.send_response(feed_event(4))
    rpc.terminate((), grpc.StatusCode.OK, "")

    assert watcher.next_cursor() == cursor(1)
    beat = watcher.next()
    assert isinstance(beat, session_service_pb2.WatchHeartbeat)
    assert beat.cursor == cursor(3)
    assert watcher.next_cursor() == cursor(4)
    watcher.resumes_after_ok(fake)


def test_unavailable_resumes_from_the_last_event_cursor_without_include_current(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel, sleeps: list[float]
) -> None:
    watcher = SessionsWatcher(client, flow_id="kyc", include_current=True)
    request, rpc = take_watch_sessions(fake)
    assert (request.after_cursor, request.include_current) == ("", True)
    rpc.send_response(feed_event(2))
    rpc.send_response(feed_event(7, session_id="s-2"))
    assert [watcher.next_cursor(), watcher.next_cursor()] == [cursor(2), cursor(7)]
    unavailable(rpc)

    request, rpc = take_watch_sessions(fake)
    assert request == session_service_pb2.WatchSessionsRequest(
        environment="live", flow_id="kyc", after_cursor=cursor(7), include_current=False
    )
    rpc.send_response(feed_event(8))
    assert watcher.next_cursor() == cursor(8)
    unavailable(rpc)

    request, rpc = take_watch_sessions(fake)
    assert (request.after_cursor, request.include_current) == (cursor(8), False)
    times_out(rpc)
    watcher.timed_out()
    assert [kwargs["wait_for_ready"] for _, kwargs in channel.calls] == [True, True, True]
    assert len(sleeps) == 2 and all(0 <= s <= 0.05 for s in sleeps)  # the counter reset on cursor 8


def test_resume_after_a_heartbeat_uses_the_heartbeat_cursor(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    watcher = SessionsWatcher(client, heartbeats=True)
    _, rpc = take_watch_sessions(fake)
    rpc.send_response(feed_event(3))
    rpc.send_response(feed_heartbeat(9))  # events 4..9 matched no filter: the position moved on
    assert watcher.next_cursor() == cursor(3)
    assert watcher.next().cursor == cursor(9)
    unavailable(rpc)

    request, rpc = take_watch_sessions(fake)
    assert request.after_cursor == cursor(9)
    rpc.send_response(feed_heartbeat(5))  # an older one (never sent by the server) does not go back
    rpc.send_response(
        session_service_pb2.WatchSessionsResponse(heartbeat=session_service_pb2.WatchHeartbeat())
    )
    assert watcher.next().cursor == cursor(5)
    assert watcher.next().cursor == ""
    unavailable(rpc)

    request, rpc = take_watch_sessions(fake)
    assert request.after_cursor == cursor(9)
    times_out(rpc)
    watcher.timed_out()
    assert after_cursors(channel) == ["", cursor(9), cursor(9)]


def test_watcher_too_slow_resumes_from_the_last_cursor_seen(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel, sleeps: list[float]
) -> None:
    watcher = SessionsWatcher(client)
    _, rpc = take_watch_sessions(fake)
    rpc.send_response(feed_event(11))
    assert watcher.next_cursor() == cursor(11)
    terminate_with(
        rpc, error_info(grpc.StatusCode.RESOURCE_EXHAUSTED, "WATCHER_TOO_SLOW", last_cursor=cursor(11))
    )

    request, rpc = take_watch_sessions(fake)
    assert request.after_cursor == cursor(11)
    rpc.send_response(feed_event(12))
    assert watcher.next_cursor() == cursor(12)
    times_out(rpc)
    watcher.timed_out()
    assert first_window(sleeps)


def test_too_many_watchers_honours_the_retry_info_delay(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel, sleeps: list[float]
) -> None:
    watcher = SessionsWatcher(client, after_cursor=cursor(5))
    _, rpc = take_watch_sessions(fake)
    terminate_with(
        rpc,
        error_info(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WATCHERS", retry_after=2.5, max_watchers="20000"
        ),
    )

    request, rpc = take_watch_sessions(fake)
    # The server's delay (plus up to a quarter of it), not the backoff.
    assert len(sleeps) == 1 and 2.5 <= sleeps[0] <= 3.125
    assert request.after_cursor == cursor(5)
    terminate_with(rpc, error_info(grpc.StatusCode.UNAVAILABLE, "SERVER_BUSY", retry_after=0.125))

    _, rpc = take_watch_sessions(fake)
    assert len(sleeps) == 2 and 0.125 <= sleeps[1] <= 0.15625
    times_out(rpc)
    watcher.timed_out()


def test_cursor_expired_raises_the_typed_error_with_the_oldest_cursor(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    watcher = SessionsWatcher(client, after_cursor=cursor(1))
    _, rpc = take_watch_sessions(fake)
    terminate_with(rpc, error_info(grpc.StatusCode.OUT_OF_RANGE, "CURSOR_EXPIRED", oldest_cursor=cursor(40)))

    error = watcher.error()
    assert isinstance(error, CursorExpiredError) and isinstance(error, FlowsessionError)
    assert (error.code, error.reason, error.oldest_cursor) == (
        grpc.StatusCode.OUT_OF_RANGE,
        "CURSOR_EXPIRED",
        cursor(40),
    )
    assert isinstance(error.__cause__, grpc.RpcError)
    assert len(channel.calls) == 1


def test_other_errors_raise_without_reopening(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    watcher = SessionsWatcher(client)
    _, rpc = take_watch_sessions(fake)
    terminate_with(
        rpc,
        rich_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid request",
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field="after_cursor", description="not a cursor"
                    )
                ]
            ),
        ),
    )
    error = watcher.error()
    assert type(error) is FlowsessionError
    assert error.field_violations == [("after_cursor", "not a cursor")]

    watcher = SessionsWatcher(client)
    _, rpc = take_watch_sessions(fake)
    terminate_with(rpc, error_info(grpc.StatusCode.OUT_OF_RANGE, "SOMETHING_ELSE"))
    assert type(watcher.error()) is FlowsessionError
    assert len(channel.calls) == 2


def test_first_resume_without_a_cursor_re_sends_the_original_request(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    watcher = SessionsWatcher(
        client, flow_id="kyc", statuses=[session_pb2.SESSION_STATUS_RUNNING], include_current=True
    )
    original, rpc = take_watch_sessions(fake)
    rpc.send_response(
        session_service_pb2.WatchSessionsResponse(heartbeat=session_service_pb2.WatchHeartbeat())
    )
    unavailable(rpc)  # nothing yielded, no cursor seen (an empty database's heartbeat has none)

    request, rpc = take_watch_sessions(fake)
    # Nothing was delivered yet, so the include_current snapshot is still owed: same request.
    assert request == original
    assert (request.after_cursor, request.include_current) == ("", True)
    rpc.send_response(feed_event(3))
    assert watcher.next_cursor() == cursor(3)
    unavailable(rpc)

    request, rpc = take_watch_sessions(fake)
    assert (request.after_cursor, request.include_current, request.flow_id) == (cursor(3), False, "kyc")
    assert list(request.statuses) == [session_pb2.SESSION_STATUS_RUNNING]
    times_out(rpc)
    watcher.timed_out()


def test_a_stream_from_now_cut_before_any_cursor_resumes_from_the_servers_last_cursor(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    # The server says where the from-now stream stood when it ended it: resuming there misses
    # nothing committed before the reopen (re-sending "from now" would).
    watcher = SessionsWatcher(client, flow_id="kyc")
    original, rpc = take_watch_sessions(fake)
    assert original.after_cursor == ""
    terminate_with(rpc, error_info(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", 1.0, last_cursor=cursor(7)))

    request, rpc = take_watch_sessions(fake)
    assert (request.after_cursor, request.include_current, request.flow_id) == (cursor(7), False, "kyc")
    rpc.send_response(feed_event(8))
    assert watcher.next_cursor() == cursor(8)
    terminate_with(rpc, error_info(grpc.StatusCode.RESOURCE_EXHAUSTED, "WATCHER_TOO_SLOW", last_cursor=cursor(6)))

    request, rpc = take_watch_sessions(fake)
    assert request.after_cursor == cursor(8)  # the server's older position moves nothing
    times_out(rpc)
    watcher.timed_out()


def test_events_at_or_before_the_last_cursor_are_skipped_within_an_epoch(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    watcher = SessionsWatcher(client, max_reconnects=1)
    _, rpc = take_watch_sessions(fake)
    rpc.send_response(feed_event(0x10))
    assert watcher.next_cursor() == cursor(0x10)
    unavailable(rpc)

    _, rpc = take_watch_sessions(fake)
    rpc.send_response(feed_event(0x0F))  # older: skipped (hex order, not string order of "f" vs "10")
    rpc.send_response(feed_event(0x10))  # the boundary repeated: skipped
    rpc.send_response(feed_event(0x09, epoch="e2"))  # another epoch: not comparable, yielded
    assert watcher.next_cursor() == cursor(0x09, "e2")
    rpc.send_response(feed_event(0x11, epoch="e2"))
    assert watcher.next_cursor() == cursor(0x11, "e2")
    unavailable(rpc)

    _, rpc = take_watch_sessions(fake)
    rpc.send_response(feed_event(0x11, epoch="e2"))  # a repeat only: no progress for the cap
    unavailable(rpc)
    assert watcher.error().code is grpc.StatusCode.UNAVAILABLE
    assert after_cursors(channel) == ["", cursor(0x10), cursor(0x11, "e2")]


def test_watch_sessions_max_reconnects_caps_consecutive_reconnects(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    watcher = SessionsWatcher(client, max_reconnects=2)
    for _ in range(3):
        _, rpc = take_watch_sessions(fake)
        unavailable(rpc)

    error = watcher.error()
    assert (error.code, error.message) == (grpc.StatusCode.UNAVAILABLE, "Socket closed")
    assert len(channel.calls) == 3


class UpperBound:
    """Stands in for the random module inside tenacity.wait: uniform(a, b) returns b, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return b


def test_backoff_without_retry_info_widens_exponentially_is_capped_and_resets_on_an_event(
    client: Client,
    fake: grpc_testing.Channel,
    channel: RecordingChannel,
    sleeps: list[float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = UpperBound()
    monkeypatch.setattr(tenacity.wait, "random", rng)
    watcher = SessionsWatcher(client)
    for _ in range(10):
        _, rpc = take_watch_sessions(fake)
        unavailable(rpc)
    _, rpc = take_watch_sessions(fake)
    rpc.send_response(feed_event(1))
    assert watcher.next_cursor() == cursor(1)
    terminate_with(rpc, error_info(grpc.StatusCode.RESOURCE_EXHAUSTED, "WATCHER_TOO_SLOW"))
    _, rpc = take_watch_sessions(fake)
    times_out(rpc)
    watcher.timed_out()

    windows = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    assert sleeps == pytest.approx([*windows, 0.05])  # the event reset the attempt count
    # Full jitter: each sleep is drawn uniformly from [0, window].
    assert [low for low, _ in rng.calls] == [0] * 11
    assert [high for _, high in rng.calls] == pytest.approx([*windows, 0.05])


def test_backoff_sleeps_are_jittered_within_their_window(
    client: Client, fake: grpc_testing.Channel, sleeps: list[float]
) -> None:
    watcher = SessionsWatcher(client, max_reconnects=12)
    for _ in range(13):
        _, rpc = take_watch_sessions(fake)
        unavailable(rpc)
    assert watcher.error().code is grpc.StatusCode.UNAVAILABLE

    windows = [min(5.0, 0.05 * 2**n) for n in range(12)]
    assert len(sleeps) == 12
    assert all(0 <= s <= w for s, w in zip(sleeps, windows, strict=True))
    assert len(set(sleeps)) == 12  # random, not a fixed schedule


def test_closing_the_sessions_iterator_cancels_the_stream(client: Client, fake: grpc_testing.Channel) -> None:
    events = client.watch_sessions("live")
    first = queue.Queue[Any]()
    threading.Thread(target=lambda: first.put(next(events)), daemon=True).start()
    _, rpc = take_watch_sessions(fake)
    rpc.send_response(feed_event(1))
    assert first.get(timeout=DEADLINE).cursor == cursor(1)

    events.close()
    within_deadline(rpc.cancelled)


@pytest.mark.parametrize(
    "cursor_, last, expected",
    [
        (f"e1-{5:016x}", f"e1-{5:016x}-0a0b0c0d", True),  # an untagged (older server's) cursor, same place
        (f"e1-{4:016x}-00000001", f"e1-{5:016x}", True),
        (f"e1-{6:016x}-00000001", f"e1-{5:016x}-00000002", False),
        (f"e2-{1:016x}-00000001", f"e1-{5:016x}-00000002", False),  # another database: not comparable
        ("junk", f"e1-{5:016x}", False),
    ],
)
def test_cursor_order_ignores_the_tag_and_needs_one_epoch(cursor_: str, last: str, expected: bool) -> None:
    assert client_module._not_after(cursor_, last) is expected


def test_watch_sessions_resumes_after_an_ok_end_it_never_sends_itself(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel, sleeps: list[float]
) -> None:
    # WatchSessions never ends by itself, so an OK end (a proxy closing the stream) is a break to
    # resume from, not the end of the iterator: it returned silently once.
    watcher = SessionsWatcher(client, max_reconnects=1)
    _, rpc = take_watch_sessions(fake)
    rpc.send_response(feed_event(0x10))
    assert watcher.next_cursor() == cursor(0x10)
    rpc.terminate((), grpc.StatusCode.OK, "")

    request, rpc = take_watch_sessions(fake)
    assert request.after_cursor == cursor(0x10)
    assert first_window(sleeps)
    rpc.terminate((), grpc.StatusCode.OK, "")  # again, with no progress: the cap is reached
    error = watcher.error()
    assert error.code is grpc.StatusCode.UNAVAILABLE and "OK" in error.message
