"""WatchSession: current state first, every change in order, OK after the terminal event; resume."""
from __future__ import annotations

import queue
import sqlite3
import threading
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from flowsession.client import FlowsessionError, connect
from flowsession.v1 import flow_pb2, session_pb2, session_service_pb2 as spb
from flowsession.v1.session_service_pb2_grpc import SessionServiceStub
from flowsession_server.api import app
from flowsession_server.clock import FakeClock, SystemClock

from ..support import (
    TIMEOUT,
    Blackhole,
    Gate,
    ServerThread,
    expect_error,
    first_events,
    new_session,
    open_streams,
    published_flow,
    report,
    settings_for,
    wait_until,
    watch_raw,
    watcher_count,
)

EV = session_pb2


def test_watch_from_zero_sends_current_state_then_every_change_and_ends_ok(client):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    report(client, sid, "document", "ok")  # version 2 is the current state when the watch opens
    stream = client.sessions.WatchSession(
        spb.WatchSessionRequest(environment="live", session_id=sid), timeout=TIMEOUT
    )
    first = next(stream).event
    assert (first.version, first.session.current_step_id) == (2, "liveness")
    report(client, sid, "liveness", "retry")
    report(client, sid, "liveness", "ok")
    rest = [r.event for r in stream]  # ends by itself after the terminal event
    assert [e.version for e in rest] == [3, 4]
    assert [e.type for e in rest] == [EV.SESSION_EVENT_TYPE_STEP_COMPLETED, EV.SESSION_EVENT_TYPE_COMPLETED]
    assert rest[-1].session.status == EV.SESSION_STATUS_COMPLETED
    assert rest[-1].session.outcome == flow_pb2.SESSION_OUTCOME_ACCEPTED
    assert stream.code() is grpc.StatusCode.OK
    # Each event carries the full session as it stood after the change, and a cursor.
    assert all(e.session.version == e.version and e.cursor for e in [first, *rest])
    assert first.cursor < rest[0].cursor < rest[1].cursor


def test_watch_of_a_terminal_session_sends_its_state_and_ends_at_once(client):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    report(client, sid, "document", "bad")
    events = watch_raw(client, sid)
    assert [(e.version, e.type) for e in events] == [(2, EV.SESSION_EVENT_TYPE_COMPLETED)]
    assert watch_raw(client, sid, after_version=2) == []


def test_watch_after_version_replays_the_log_then_goes_live(client):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    report(client, sid, "document", "ok")
    report(client, sid, "liveness", "retry")
    got: queue.Queue = queue.Queue()

    def watch() -> None:
        stream = client.sessions.WatchSession(
            spb.WatchSessionRequest(environment="live", session_id=sid, after_version=1), timeout=TIMEOUT
        )
        for r in stream:
            got.put(r.event)
        got.put(None)

    threading.Thread(target=watch, daemon=True).start()
    assert [got.get(timeout=TIMEOUT).version for _ in range(2)] == [2, 3]  # replayed from the log
    client.sessions.AbortSession(spb.AbortSessionRequest(environment="live", session_id=sid, reason="user left"), timeout=TIMEOUT)
    last = got.get(timeout=TIMEOUT)
    assert (last.version, last.type, last.session.abort_reason) == (4, EV.SESSION_EVENT_TYPE_ABORTED, "user left")
    assert got.get(timeout=TIMEOUT) is None


def test_many_watchers_see_every_change_once_in_order(client):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    report(client, sid, "document", "ok")
    streams = [
        client.sessions.WatchSession(spb.WatchSessionRequest(environment="live", session_id=sid), timeout=TIMEOUT)
        for _ in range(20)
    ]
    for s in streams:  # every stream is open and has its current state before the changes start
        assert next(s).event.version == 2
    for _ in range(10):
        report(client, sid, "liveness", "retry")
    report(client, sid, "liveness", "ok")
    for s in streams:
        assert [r.event.version for r in s] == list(range(3, 14))


def test_watch_errors(client):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    watch = lambda request, timeout: list(client.sessions.WatchSession(request, timeout=timeout))  # noqa: E731
    expect_error(watch, spb.WatchSessionRequest(environment="live", session_id="ses_missing"), grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    expect_error(watch, spb.WatchSessionRequest(environment="staging", session_id=sid), grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    expect_error(watch, spb.WatchSessionRequest(environment="nowhere", session_id=sid), grpc.StatusCode.INVALID_ARGUMENT, fields=("environment",))
    expect_error(
        watch,
        spb.WatchSessionRequest(environment="live", session_id=sid, after_version=-1),
        grpc.StatusCode.INVALID_ARGUMENT,
        fields=("after_version",),
    )
    err = expect_error(
        watch, spb.WatchSessionRequest(environment="live", session_id=sid, after_version=5), grpc.StatusCode.OUT_OF_RANGE, "VERSION_AHEAD"
    )
    assert err.metadata["version"] == "1"


def test_client_watch_yields_events_until_terminal(client):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    got: queue.Queue = queue.Queue()

    def consume() -> None:
        for event in client.watch("live", sid, timeout=TIMEOUT):
            got.put(event.version)
        got.put(None)

    threading.Thread(target=consume, daemon=True).start()
    assert got.get(timeout=TIMEOUT) == 1
    report(client, sid, "document", "ok")
    report(client, sid, "liveness", "bad")
    assert [got.get(timeout=TIMEOUT) for _ in range(3)] == [2, 3, None]



def test_a_connection_gone_silent_is_found_by_keepalive_and_the_watch_resumes(server, client):
    # A peer that vanishes without closing the connection is noticed by keepalive alone. gRPC waits
    # grpc.http2.ping_timeout_ms (1 minute unless set) for the ack, not keepalive_timeout_ms, so the
    # watch sat on the dead connection for a minute instead of resuming after the timeout it was given.
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    proxy = Blackhole(server.address)
    try:
        fast = [("grpc.keepalive_time_ms", 1_000), ("grpc.keepalive_timeout_ms", 500)]
        with connect(proxy.address, options=fast) as watching:
            events = watching.watch("live", sid, timeout=TIMEOUT)  # a stream attempt lasts TIMEOUT at most
            assert next(events).version == 1
            proxy.silence()
            report(client, sid, "document", "ok")  # committed while the connection is silent
            assert next(events).version == 2  # on a new connection, after the dead one was given up
            events.close()
    finally:
        proxy.close()


def test_the_server_frees_the_watcher_slot_of_a_client_gone_silent(tmp_path, monkeypatch):
    """The server's own pings find a client that vanished without closing (its keepalive off here):
    within keepalive_time + the ack timeout, not gRPC's default minute for the ack. The server's
    keepalive times are scaled down 100-fold; what the test checks is that an ack timeout is set."""
    timing = {"grpc.keepalive_time_ms", "grpc.keepalive_timeout_ms", "grpc.http2.ping_timeout_ms"}
    scaled = [(k, v // 100 if k in timing else v) for k, v in app.SERVER_OPTIONS]
    monkeypatch.setattr(app, "SERVER_OPTIONS", scaled)
    server = ServerThread(settings_for(tmp_path))
    proxy = Blackhole(server.address)
    try:
        with connect(server.address) as client:
            sid = new_session(client, published_flow(client)).session.session_id
        with grpc.insecure_channel(proxy.address) as silent:
            stream = SessionServiceStub(silent).WatchSession(
                spb.WatchSessionRequest(environment="live", session_id=sid), timeout=60
            )
            assert next(stream).event.version == 1
            assert watcher_count(server) == 1
            proxy.silence()
            wait_until(lambda: watcher_count(server) == 0, timeout=5.0)  # 1.2 + 0.2 s; without the ack timeout 61 s
            stream.cancel()
    finally:
        proxy.close()
        server.stop()


def session_with_big_events(client, retries: int = 0) -> str:
    """A session at version 2 + ``retries`` whose every event carries a 200 KB input: a few events fill
    the transport's buffers, so a client that stops reading soon holds the server's sends."""
    flow_id = published_flow(client)
    payload = struct_pb2.Struct()
    payload.update({"blob": "x" * 200_000})
    sid = new_session(client, flow_id, input=payload).session.session_id
    report(client, sid, "document", "ok")
    for _ in range(retries):
        report(client, sid, "liveness", "retry")
    return sid


def read_until_cut(stream: Any, first: int) -> tuple[list[int], FlowsessionError]:
    """The versions a cut stream still delivers after ``first`` (already read), and the error it ends with."""
    received = [first]
    with pytest.raises(grpc.RpcError) as info:
        for response in stream:
            received.append(response.event.version)
    return received, FlowsessionError.from_rpc_error(info.value)


def test_a_watch_that_stops_reading_is_cut_off_with_the_last_version_it_was_sent(tmp_path):
    server = ServerThread(settings_for(tmp_path, watch_queue=2))
    try:
        with connect(server.address) as client:
            sid = session_with_big_events(client)  # the server-side queue overflows soon
            stalled = client.sessions.WatchSession(
                spb.WatchSessionRequest(environment="live", session_id=sid), timeout=TIMEOUT
            )
            assert next(stalled).event.version == 2  # open and live; now it stops reading
            version = 2
            while watcher_count(server) == 1 and version < 300:
                version = report(client, sid, "liveness", "retry").version  # liveness routes retry to itself
            assert watcher_count(server) == 0, "the stalled watch was never cut off"
            received, error = read_until_cut(stalled, first=2)
            assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "WATCHER_TOO_SLOW")
            assert received == list(range(2, len(received) + 2)) and received[-1] < version
            # The last version the server knows it handed over; the one it was sending when it cut the
            # stream may still have arrived.
            assert error.metadata["last_version"] in (str(received[-1] - 1), str(received[-1]))
            last = int(error.metadata["last_version"])
            report(client, sid, "liveness", "ok")
            resumed = watch_raw(client, sid, after_version=last)
            assert [e.version for e in resumed] == list(range(last + 1, version + 2))  # no gap, no duplicate
    finally:
        server.stop()


def end_in_four_versions(client, sid: str) -> None:
    report(client, sid, "document", "ok")
    report(client, sid, "liveness", "retry")
    report(client, sid, "liveness", "ok")  # terminal at version 4


def resumed_after_1_expires(client, sid: str) -> FlowsessionError:
    watch = lambda request, timeout: list(client.sessions.WatchSession(request, timeout=timeout))  # noqa: E731
    request = spb.WatchSessionRequest(environment="live", session_id=sid, after_version=1)
    return expect_error(watch, request, grpc.StatusCode.OUT_OF_RANGE, "CURSOR_EXPIRED")


def test_resuming_after_versions_retention_pruned_is_cursor_expired_not_a_gap(tmp_path):
    clock = FakeClock(SystemClock().now())
    server = ServerThread(settings_for(tmp_path, event_retention=timedelta(days=7)), clock=clock)
    try:
        with connect(server.address) as client:
            flow_id = published_flow(client)
            sid = new_session(client, flow_id).session.session_id
            end_in_four_versions(client, sid)
            clock.advance(timedelta(days=8))
            assert server.call(server.server.retention.prune()) == 3  # versions 1-3; the latest is kept
            assert resumed_after_1_expires(client, sid).metadata["oldest_version"] == "4"
            # Nothing after version 3 is missing, and watching from 0 starts at the retained state.
            assert [e.version for e in watch_raw(client, sid, after_version=3)] == [4]
            assert [e.version for e in watch_raw(client, sid)] == [4]
    finally:
        server.stop()


def test_a_hole_in_a_sessions_versions_is_cursor_expired_not_skipped(server, client):
    """A page of the log with a version missing in the middle (retention part-way through its pass, or
    versions stamped out of order) was sent with the hole: only its first version was checked."""
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    end_in_four_versions(client, sid)
    with sqlite3.connect(server.settings.db_path) as db:
        db.execute("DELETE FROM events WHERE session_id = ? AND version = 3", [sid])
    assert resumed_after_1_expires(client, sid).metadata["oldest_version"] == "4"  # what follows on from the hole
    assert [e.version for e in watch_raw(client, sid, after_version=3)] == [4]


def test_watch_from_zero_starts_at_the_retained_state_when_retention_prunes_the_one_it_read(tmp_path):
    # The stream reads the session (version 1, older than retention), then its log. If the session
    # ends in between and retention prunes version 1 (no longer the latest), after_version 0 must still
    # work: it starts from the oldest retained event, the current state.
    from concurrent.futures import ThreadPoolExecutor

    clock = FakeClock(SystemClock().now())
    server = ServerThread(settings_for(tmp_path, event_retention=timedelta(days=7)), clock=clock)
    try:
        with connect(server.address) as client, ThreadPoolExecutor(max_workers=1) as pool:
            flow_id = published_flow(client, timeout_s=30 * 86400)
            sid = new_session(client, flow_id).session.session_id
            clock.advance(timedelta(days=8))
            gate = Gate(server, "events_after")  # the stream's read of the log waits
            watched = pool.submit(watch_raw, client, sid)
            assert gate.entered.wait(TIMEOUT)
            aborted = client.sessions.AbortSession(
                spb.AbortSessionRequest(environment="live", session_id=sid, reason="user left"), timeout=TIMEOUT
            ).session
            assert aborted.version == 2
            assert server.call(server.server.retention.prune()) == 1  # version 1
            gate.open()
            events = watched.result(TIMEOUT)
            assert [(e.version, e.type) for e in events] == [(2, EV.SESSION_EVENT_TYPE_ABORTED)]
    finally:
        server.stop()


def test_a_watch_ended_while_it_reads_its_backlog_ends_before_sending_more(tmp_path):
    # The hub ends every watcher at shutdown (and a too-slow one) at once; a stream blocked in a send is
    # interrupted, one reading the log is not, so it must notice before its next send. Otherwise it
    # replays its whole backlog first, and to a client that stopped reading it blocks in a send nothing
    # interrupts any more: no SHUTTING_DOWN, the watcher slot held, the stop's grace run out.
    server = ServerThread(settings_for(tmp_path))
    try:
        with connect(server.address) as client:
            sid = session_with_big_events(client, retries=60)
            gate = Gate(server, "events_after")  # the stream's read of its backlog waits
            stalled = client.sessions.WatchSession(
                spb.WatchSessionRequest(environment="live", session_id=sid, after_version=1), timeout=TIMEOUT
            )
            assert gate.entered.wait(TIMEOUT)

            async def shut() -> None:
                server.server.hub.close()  # what stop() does once the drain is over

            server.call(shut())
            gate.open()
            wait_until(lambda: watcher_count(server) == 0, timeout=3.0)
            with pytest.raises(grpc.RpcError) as info:
                for response in stalled:
                    raise AssertionError(f"sent after the watch was ended: version {response.event.version}")
            error = FlowsessionError.from_rpc_error(info.value)
            assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
            assert error.metadata["last_version"] == "1"
    finally:
        server.stop()


@pytest.mark.parametrize("end", ["cancel", "deadline"])
def test_a_client_leaving_while_its_stream_is_blocked_in_a_send_is_no_server_fault(tmp_path, caplog, end):
    # The server's write to a client that stopped reading waits on flow control; the call ending under
    # it (cancel, deadline) fails that write. That is the client going away, not an unexpected fault.
    server = ServerThread(settings_for(tmp_path))
    try:
        with connect(server.address) as client:
            sid = session_with_big_events(client, retries=60)  # 12 MB of events
            stalled = client.sessions.WatchSession(
                spb.WatchSessionRequest(environment="live", session_id=sid, after_version=1),
                timeout=1.0 if end == "deadline" else TIMEOUT,
            )
            assert next(stalled).event.version == 2  # open; now it stops reading

            async def sending() -> bool:
                (watcher,) = server.server.hub.watchers()
                return watcher._on_end is not None and watcher._on_end.__self__._sending  # type: ignore[attr-defined]

            seen: list[bool] = []  # blocked: seen sending at three looks in a row, not one write in passing
            wait_until(lambda: seen.append(server.call(sending())) or seen[-3:] == [True] * 3)
            if end == "cancel":
                stalled.cancel()
            wait_until(lambda: watcher_count(server) == 0)
            assert "unexpected error" not in caplog.text
    finally:
        server.stop()


def test_a_stream_whose_client_reads_nothing_is_cut_after_the_write_timeout(tmp_path):
    """The queue counts events, but each stream blocked in a write holds that message serialized, in
    Python and in gRPC core: a thousand clients that read a few 200 KB events and stopped pinned 470 MB,
    for as long as they stayed connected, with far fewer than the queue's events sent."""
    server = ServerThread(settings_for(tmp_path, watch_write_timeout=0.3))
    try:
        with connect(server.address) as client:
            sid = session_with_big_events(client, retries=60)  # 12 MB of events
            stalled = client.sessions.WatchSession(
                spb.WatchSessionRequest(environment="live", session_id=sid, after_version=1), timeout=TIMEOUT
            )
            assert next(stalled).event.version == 2  # open; now it stops reading
            wait_until(lambda: watcher_count(server) == 0, timeout=5.0)  # cut within about 0.4 s
            received, error = read_until_cut(stalled, first=2)
            assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "WATCHER_TOO_SLOW")
            assert int(error.metadata["last_version"]) <= received[-1] < 62  # cut long before the end
    finally:
        server.stop()


def test_a_cut_stream_whose_client_still_reads_nothing_counts_against_the_watcher_limit(tmp_path):
    """After the cut, the stream's status waits in gRPC behind the message it could not send, and the call
    holds that message (about 230 KB here) until its client reads, cancels or disconnects: a hung client
    never does. Such streams left the limit's count at the cut, so they piled up without bound."""

    server = ServerThread(settings_for(tmp_path, watch_write_timeout=0.3, max_watchers=2))
    try:
        with connect(server.address) as client:
            sid = session_with_big_events(client, retries=60)
            request = spb.WatchSessionRequest(environment="live", session_id=sid, after_version=1)
            stalled = [client.sessions.WatchSession(request, timeout=TIMEOUT) for _ in range(2)]
            assert [next(s).event.version for s in stalled] == [2, 2]  # open; now they stop reading
            wait_until(lambda: watcher_count(server) == 0, timeout=5.0)  # both cut
            assert open_streams(server) == 2
            with connect(server.address) as other:  # the stalled connection delivers nothing more
                watch = lambda request, timeout: list(other.sessions.WatchSession(request, timeout=timeout))  # noqa: E731
                expect_error(watch, request, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WATCHERS")
                stalled[0].cancel()  # its client lets go: the call ends, and its place is free
                wait_until(lambda: open_streams(server) == 1)
                assert [e.version for e in first_events(other, sid, 1, after_version=61)] == [62]
            stalled[1].cancel()
            wait_until(lambda: open_streams(server) == 0)
    finally:
        server.stop()
