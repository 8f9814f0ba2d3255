"""The client facade against grpcio-testing's fake channel: resume, dedup, rich errors.

The facade's watch() runs in a thread; the test thread plays the server through the fake channel.
Every wait in the test thread has a deadline (DEADLINE), so a broken facade fails instead of hanging.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import grpc
import grpc_testing
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from flowsession import client as client_module
from flowsession.client import KEEPALIVE_OPTIONS, Client, FlowsessionError, connect
from flowsession.v1 import session_pb2, session_service_pb2

DEADLINE = 5.0
SERVICE = session_service_pb2.DESCRIPTOR.services_by_name["SessionService"]
WATCH = SERVICE.methods_by_name["WatchSession"]
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


class Watcher:
    """Consumes client.watch(...) in a thread, reporting each event, then END or the exception."""

    def __init__(self, client: Client, **kwargs: Any) -> None:
        self._items: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(client, kwargs), daemon=True)
        self._thread.start()

    def _run(self, client: Client, kwargs: dict[str, Any]) -> None:
        try:
            for event in client.watch("live", "s-1", **kwargs):
                self._items.put(event)
            self._items.put(END)
        except BaseException as exc:  # handed to the test thread to assert on
            self._items.put(exc)

    def next(self) -> Any:
        return self._items.get(timeout=DEADLINE)

    def next_version(self) -> int:
        item = self.next()
        assert isinstance(item, session_pb2.SessionEvent), item
        return item.version

    def error(self) -> FlowsessionError:
        item = self.next()
        assert isinstance(item, FlowsessionError), item
        self._thread.join(timeout=DEADLINE)
        return item

    def ends(self) -> None:
        assert self.next() is END
        self._thread.join(timeout=DEADLINE)
        assert not self._thread.is_alive()


def event(version: int, kind: int = session_pb2.SESSION_EVENT_TYPE_STEP_COMPLETED) -> Any:
    return session_service_pb2.WatchSessionResponse(
        event=session_pb2.SessionEvent(
            version=version,
            type=kind,
            cursor=f"c{version}",
            session=session_pb2.Session(session_id="s-1", version=version),
        )
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


def after_versions(channel: RecordingChannel) -> list[int]:
    return [request.after_version for request, _ in channel.calls]


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
    assert sleeps == []  # no RetryInfo: re-open at once, gRPC's connection backoff paces it


def test_resume_before_any_event_uses_the_original_after_version(
    client: Client, fake: grpc_testing.Channel, channel: RecordingChannel
) -> None:
    watcher = Watcher(client, after_version=7)
    request, rpc = take_watch(fake)
    assert request.after_version == 7
    unavailable(rpc)

    request, rpc = take_watch(fake)
    assert request.after_version == 7
    rpc.send_response(event(8))
    rpc.terminate((), grpc.StatusCode.OK, "")
    assert watcher.next_version() == 8
    watcher.ends()


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
    # take_watch returning means the second call was made, so the sleep before it has happened.
    assert sleeps == [1.5]
    rpc.terminate((), grpc.StatusCode.OK, "")
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
    assert dict(KEEPALIVE_OPTIONS) == {
        "grpc.keepalive_time_ms": 60_000,
        "grpc.keepalive_timeout_ms": 20_000,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.http2.max_pings_without_data": 0,
    }
