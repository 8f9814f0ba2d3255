"""Expiry is active (no request needed), exact, and never shows RUNNING past the deadline."""
from __future__ import annotations

import queue
import sqlite3
import threading
from datetime import timedelta

import grpc

from flowsession.client import connect
from flowsession.v1 import session_pb2, session_service_pb2 as spb
from flowsession_server.clock import FakeClock, SystemClock

from ..support import (
    TIMEOUT,
    ServerThread,
    expect_error,
    get,
    new_session,
    published_flow,
    settings_for,
    wait_until,
)


def test_watcher_receives_expired_with_no_other_call(client):
    flow_id = published_flow(client, timeout_s=1)
    created = new_session(client, flow_id).session
    got: queue.Queue = queue.Queue()

    def consume() -> None:
        stream = client.sessions.WatchSession(
            spb.WatchSessionRequest(environment="live", session_id=created.session_id), timeout=TIMEOUT
        )
        for r in stream:
            got.put(r.event)
        got.put(None)

    threading.Thread(target=consume, daemon=True).start()
    assert got.get(timeout=TIMEOUT).type == session_pb2.SESSION_EVENT_TYPE_CREATED
    expired = got.get(timeout=TIMEOUT)
    assert expired.type == session_pb2.SESSION_EVENT_TYPE_EXPIRED
    assert expired.session.status == session_pb2.SESSION_STATUS_EXPIRED
    assert expired.session.end_time == created.expire_time
    lag = expired.event_time.ToDatetime() - created.expire_time.ToDatetime()
    assert timedelta(0) <= lag < timedelta(seconds=1), lag
    assert got.get(timeout=TIMEOUT) is None  # the stream ended after the terminal event


def test_reads_never_return_running_after_the_deadline(tmp_path):
    clock = FakeClock(SystemClock().now())
    server = ServerThread(settings_for(tmp_path), clock=clock)
    try:
        with connect(server.address) as client:
            flow_id = published_flow(client, timeout_s=3600)
            sid = new_session(client, flow_id).session.session_id
            other = new_session(client, flow_id).session.session_id
            clock.advance(timedelta(hours=1))  # exactly at expire_time: no longer RUNNING
            session = get(client, sid)
            assert session.status == session_pb2.SESSION_STATUS_EXPIRED
            assert session.version == 2
            listed = client.sessions.ListSessions(
                spb.ListSessionsRequest(environment="live", statuses=[session_pb2.SESSION_STATUS_RUNNING]), timeout=TIMEOUT
            )
            assert list(listed.sessions) == []
            # A change after the deadline is refused, and the expiry it uncovered is recorded.
            expect_error(
                client.sessions.ReportStepResult,
                spb.ReportStepResultRequest(environment="live", session_id=other, step_id="document", verdict="ok"),
                grpc.StatusCode.FAILED_PRECONDITION,
                "SESSION_TERMINAL",
            )
            after = get(client, other)
            assert (after.status, after.version) == (session_pb2.SESSION_STATUS_EXPIRED, 2)
    finally:
        server.stop()


def _status_in_db(path: str, session_id: str) -> str:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT status FROM sessions WHERE session_id = ?", [session_id]).fetchone()[0]
    finally:
        conn.close()


def test_sessions_whose_deadline_passed_while_down_expire_right_after_start(tmp_path):
    settings = settings_for(tmp_path)
    first = ServerThread(settings)
    try:
        with connect(first.address) as client:
            flow_id = published_flow(client, timeout_s=3600)
            ids = [new_session(client, flow_id).session.session_id for _ in range(3)]
    finally:
        first.stop()
    # The next start happens two hours later, as far as the server can tell.
    later = ServerThread(settings, clock=FakeClock(SystemClock().now() + timedelta(hours=2)))
    try:
        for sid in ids:  # no RPC: only the scheduler can have done it
            wait_until(lambda: _status_in_db(settings.db_path, sid) == "EXPIRED")
    finally:
        later.stop()


def test_a_wall_clock_step_forward_while_the_scheduler_sleeps_expires_within_a_second(tmp_path):
    # An NTP step or a resumed VM: the wall clock jumps while the loop's monotonic clock does not. The
    # scheduler sleeping towards a deadline an hour away must notice within its cap, not an hour later.
    clock = FakeClock(SystemClock().now())
    server = ServerThread(settings_for(tmp_path), clock=clock)
    try:
        with connect(server.address) as client:
            flow_id = published_flow(client, timeout_s=3600)
            sid = new_session(client, flow_id).session.session_id
            got: queue.Queue = queue.Queue()

            def consume() -> None:
                stream = client.sessions.WatchSession(
                    spb.WatchSessionRequest(environment="live", session_id=sid), timeout=TIMEOUT
                )
                try:
                    for r in stream:
                        got.put(r.event)
                except grpc.RpcError as err:
                    got.put(err)
                got.put(None)

            threading.Thread(target=consume, daemon=True).start()
            assert got.get(timeout=TIMEOUT).type == session_pb2.SESSION_EVENT_TYPE_CREATED
            clock.advance(timedelta(hours=2))  # no RPC from here: only the scheduler can expire it
            expired = got.get(timeout=3)  # the cap is 1 s; 3 s leaves room for a loaded machine
            assert expired.type == session_pb2.SESSION_EVENT_TYPE_EXPIRED, expired
            assert got.get(timeout=TIMEOUT) is None
    finally:
        server.stop()
