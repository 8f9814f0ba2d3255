"""The process: console entry, health, reflection, graceful SIGTERM, and watch resume across a restart."""
from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import select
import subprocess
import sys
import termios
import time
from pathlib import Path
import queue
from collections.abc import Callable, Iterable
from typing import Any
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import jwt
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from flowsession.client import CursorExpiredError, FlowsessionError, connect
from flowsession.v1 import flow_service_pb2 as fpb, session_pb2, session_service_pb2 as spb
from flowsession_server.api import streams as streams_module, tokens
from flowsession_server.api.app import CannotListen, build_server
from flowsession_server.events import hub as hub_module
from flowsession_server.domain.errors import DomainError, Unavailable
from flowsession_server.store import reads

from ..support import (
    TIMEOUT,
    ServerProcess,
    ServerThread,
    current_cursor,
    expect_error,
    get,
    new_session,
    published_flow,
    report,
    rpc_error,
    settings_for,
    wait_until,
    open_streams,
    watcher_count,
)


def test_health_is_serving(client):
    stub = health_pb2_grpc.HealthStub(client._channel)
    for service in ("", "flowsession.v1.SessionService", "flowsession.v1.FlowService"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_health_lists_every_service_as_check_answers_it(client):
    stub = health_pb2_grpc.HealthStub(client._channel)
    listed = stub.List(health_pb2.HealthListRequest(), timeout=TIMEOUT).statuses
    assert set(listed) == {"", "flowsession.v1.SessionService", "flowsession.v1.FlowService"}
    for service, reply in listed.items():
        assert reply == stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(client):
    stub = reflection_pb2_grpc.ServerReflectionStub(client._channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT)
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"flowsession.v1.FlowService", "flowsession.v1.SessionService", "grpc.health.v1.Health"} <= names


def test_an_open_reflection_stream_ends_with_shutting_down_and_does_not_hold_the_stop(server, client):
    requests: queue.Queue = queue.Queue()
    requests.put(reflection_pb2.ServerReflectionRequest(list_services=""))
    stub = reflection_pb2_grpc.ServerReflectionStub(client._channel)
    replies = stub.ServerReflectionInfo(iter(requests.get, None), timeout=TIMEOUT)  # open until None
    assert next(replies).list_services_response.service
    stopping = asyncio.run_coroutine_threadsafe(server.server.stop(60), server.loop)
    with pytest.raises(grpc.RpcError) as info:
        next(replies)
    assert FlowsessionError.from_rpc_error(info.value).reason == "SHUTTING_DOWN"
    stopping.result(TIMEOUT)  # not the 60 s grace
    requests.put(None)


def test_environment_variables_configure_serve(tmp_path):
    db = tmp_path / "from-env.db"
    proc = ServerProcess(db, env={"FLOWSESSION_ADDRESS": "127.0.0.1:0", "FLOWSESSION_DB": str(db)})
    try:
        with connect(proc.address) as client:
            published_flow(client)
        assert db.exists()
    finally:
        assert proc.terminate() == 0
        proc.close()


# The child sends itself SIGTERM the instant it has printed "listening on", as a supervisor that reads
# that line and stops the server at once would.
_SIGTERM_AT_LISTENING = """
import os, signal, sys
from flowsession_server import cli

def print_then_sigterm(*args, **kwargs):
    print(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)

cli.print = print_then_sigterm
sys.exit(cli.main(["serve", "--address", "127.0.0.1:0", "--db", sys.argv[1]]))
"""


def test_sigterm_right_after_listening_is_a_graceful_stop(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _SIGTERM_AT_LISTENING, str(tmp_path / "flowsession.db")],
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert proc.stdout.startswith("listening on "), (proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stderr  # not -SIGTERM: the handler was in place before the line
    assert "shutting down" in proc.stderr


def test_a_stopping_server_refuses_a_write_stuck_behind_another_process_lock_within_the_grace(tmp_path):
    """Another process holds the write lock past the grace: the waiting write is answered SHUTTING_DOWN
    (with ErrorInfo, nothing written) and the stop ends within the grace, where gRPC used to cancel
    the call bare at the grace's end, the stop then waited for the lock, and the write landed."""
    server = ServerThread(settings_for(tmp_path))
    try:
        with connect(server.address) as client:
            flow_id = published_flow(client)
            holder = sqlite3.connect(server.server.settings.db_path, isolation_level=None)
            try:
                holder.execute("BEGIN IMMEDIATE")
                with ThreadPoolExecutor(max_workers=1) as pool:
                    request = spb.CreateSessionRequest(flow_id=flow_id, environment="live")
                    write = pool.submit(rpc_error, client.sessions.CreateSession, request)
                    wait_until(lambda: server.server.store.queued_writes == 1)  # in the writer, waiting
                    stopping = asyncio.run_coroutine_threadsafe(server.server.stop(2.0), server.loop)
                    error = write.result(timeout=TIMEOUT)
                    stopping.result(TIMEOUT)  # while the lock is still held: not the 30 s lock wait
                assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"), error
                assert error.retry_delay == 1.0
            finally:
                holder.execute("ROLLBACK")
                holder.close()
    finally:
        server.stop()
    with contextlib.closing(sqlite3.connect(server.server.settings.db_path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 0


WRITERS = 24


def test_sigterm_ends_watches_with_unavailable_finishes_writes_and_exits_0(tmp_path):
    db = tmp_path / "flowsession.db"
    # A grace period far longer than the waits below: no open stream, health watches included, may hold it.
    proc = ServerProcess(db, "--shutdown-grace", "120")
    acked: list[str] = []
    try:
        with connect(proc.address) as client:
            flow_id = published_flow(client)
            sid = new_session(client, flow_id).session.session_id
            stream = client.sessions.WatchSession(spb.WatchSessionRequest(environment="live", session_id=sid), timeout=TIMEOUT)
            assert next(stream).event.version == 1
            health = health_pb2_grpc.HealthStub(client._channel).Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
            assert next(health).status == health_pb2.HealthCheckResponse.SERVING
            started = threading.Event()
            codes: queue.Queue = queue.Queue()

            def writes() -> None:
                while True:  # until the stopping server refuses a call
                    try:
                        acked.append(new_session(client, flow_id).session.session_id)
                        started.set()
                    except grpc.RpcError as err:
                        codes.put(err.code())
                        return

            # Enough calls in flight that some still wait in gRPC core, not yet picked up, at SIGTERM.
            with ThreadPoolExecutor(max_workers=WRITERS) as pool:
                workers = [pool.submit(writes) for _ in range(WRITERS)]
                assert started.wait(TIMEOUT)
                proc.proc.send_signal(15)
                assert next(health).status == health_pb2.HealthCheckResponse.NOT_SERVING
                for ending in (health, stream):  # both end with UNAVAILABLE / SHUTTING_DOWN
                    with pytest.raises(grpc.RpcError) as info:
                        next(ending)
                    error = FlowsessionError.from_rpc_error(info.value)
                    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
                for w in workers:
                    w.result(timeout=TIMEOUT)
            assert proc.proc.wait(TIMEOUT) == 0
            # A call refused by the stopping server is UNAVAILABLE (SHUTTING_DOWN, or no server left to
            # connect to), a status clients retry: never CANCELLED (gRPC core cancels the calls it holds
            # when it stops; the server drains them first), INTERNAL or UNKNOWN.
            refused = [codes.get() for _ in range(codes.qsize())]
            assert len(refused) == WRITERS and set(refused) == {grpc.StatusCode.UNAVAILABLE}
    finally:
        proc.close()
    again = ServerProcess(db)
    try:
        with connect(again.address) as client:
            for sid in acked:
                assert get(client, sid).version == 1
    finally:
        again.terminate()
        again.close()


def consumed(items: Callable[[], Iterable[Any]], what: Callable[[Any], Any]) -> queue.Queue:
    """Iterates ``items()`` on a thread; the queue gets ``what(item)`` for each, then "end" or the
    exception that ended the iteration."""
    got: queue.Queue = queue.Queue()

    def consume() -> None:
        try:
            for item in items():
                got.put(what(item))
            got.put("end")
        except Exception as exc:  # surfaced to the test thread
            got.put(exc)

    threading.Thread(target=consume, daemon=True).start()
    return got


def _restarted(server: ServerProcess, db: Path, client: Any) -> ServerProcess:
    """SIGTERM (exit 0), then a new process on the same address and file; returns once the client's
    channel is connected again (a unary call made during its reconnect backoff fails fast)."""
    assert server.terminate() == 0
    again = ServerProcess(db, address=server.address)
    grpc.channel_ready_future(client._channel).result(timeout=TIMEOUT)
    return again


def test_client_watch_resumes_across_a_server_restart_without_gap_or_duplicate(tmp_path):
    db = tmp_path / "flowsession.db"
    first = ServerProcess(db)
    with connect(first.address) as client:
        flow_id = published_flow(client)
        sid = new_session(client, flow_id).session.session_id
        got = consumed(lambda: client.watch("live", sid, timeout=60), lambda event: event.version)
        assert got.get(timeout=TIMEOUT) == 1
        report(client, sid, "document", "ok")
        assert got.get(timeout=TIMEOUT) == 2
        _restarted(first, db, client)
        # Changes made as soon as the server is back, whether or not the watcher has resumed yet
        # (replayed from the log, or live): each arrives once, in order.
        report(client, sid, "liveness", "retry")
        report(client, sid, "liveness", "ok")
        assert [got.get(timeout=TIMEOUT) for _ in range(3)] == [3, 4, "end"]
        assert get(client, sid).status == session_pb2.SESSION_STATUS_COMPLETED


def test_health_watches_opened_during_shutdown_are_told_not_serving_and_end(server, client):
    stub = health_pb2_grpc.HealthStub(client._channel)
    open_before = stub.Watch(health_pb2.HealthCheckRequest(service="flowsession.v1.SessionService"), timeout=TIMEOUT)
    assert next(open_before).status == health_pb2.HealthCheckResponse.SERVING
    server.call(server.server.health.close(tell_timeout=TIMEOUT))  # what stop() does first
    assert next(open_before).status == health_pb2.HealthCheckResponse.NOT_SERVING
    opened_after = stub.Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert next(opened_after).status == health_pb2.HealthCheckResponse.NOT_SERVING
    for stream in (open_before, opened_after):
        with pytest.raises(grpc.RpcError) as info:
            next(stream)
        assert FlowsessionError.from_rpc_error(info.value).reason == "SHUTTING_DOWN"
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_stopping_server_refuses_calls_at_once_however_long_its_health_watches_take(server, client):
    health = health_pb2_grpc.HealthStub(client._channel)
    unknown = health.Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=TIMEOUT)  # is never told
    assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    stopping = asyncio.run_coroutine_threadsafe(server.server.stop(60), server.loop)
    expect_error(client.flows.CreateFlow, fpb.CreateFlowRequest(name="late"), grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
    stopping.result(TIMEOUT)
    with pytest.raises(grpc.RpcError):
        next(unknown)


def test_health_is_not_serving_while_the_store_cannot_commit(server, client):
    # Retention's first pass commits at start-up, and any commit turns health back to SERVING.
    wait_until(lambda: server.server.retention.passes >= 1)
    stub = health_pb2_grpc.HealthStub(client._channel)

    def status():
        return stub.Check(health_pb2.HealthCheckRequest(service="flowsession.v1.SessionService"), timeout=TIMEOUT).status

    def failing_disk(conn):
        raise sqlite3.OperationalError("disk I/O error")

    async def write(command):
        try:
            return await server.server.store._writer.submit(command)
        except Unavailable as exc:
            return exc.reason

    assert server.call(write(failing_disk)) == "STORE_UNAVAILABLE"
    wait_until(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING)
    published_flow(client)  # the next commit succeeds: the store is writable again
    wait_until(lambda: status() == health_pb2.HealthCheckResponse.SERVING)


def test_session_tokens_stay_valid_across_a_restart(tmp_path):
    """The signing key is created with the database, so a token verifies against the restarted server's key."""
    settings = settings_for(tmp_path)
    first = ServerThread(settings)
    try:
        with connect(first.address) as client:
            created = new_session(client, published_flow(client))
    finally:
        first.stop()
    second = ServerThread(settings)
    try:
        claims = tokens.verify(created.session_token, second.server.store.keys.token_key)
        assert claims["sub"] == created.session.session_id and claims["env"] == "live"
        assert claims["exp"] == created.session.expire_time.seconds
        with pytest.raises(jwt.InvalidSignatureError):
            tokens.verify(created.session_token, b"another key" * 3)
    finally:
        second.stop()


def test_a_failing_read_is_unavailable_and_expiry_keeps_running(server, client, monkeypatch, caplog):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    # The scheduler has read the session's deadline and sleeps: only a new, earlier one can wake it.
    wait_until(lambda: server.server.expiry._next_due is not None)

    def broken(*args):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(reads, "get_session", broken)
    monkeypatch.setattr(reads, "next_expiry_us", broken)
    err = expect_error(
        client.sessions.GetSession,
        spb.GetSessionRequest(environment="live", session_id=sid),
        grpc.StatusCode.UNAVAILABLE,
        "STORE_UNAVAILABLE",
    )
    assert err.retry_delay == 1.0
    sooner = published_flow(client, timeout_s=3600)  # 1 h, before the first session's 24 h
    new_session(client, sooner)  # an earlier deadline wakes the scheduler, whose next read fails
    wait_until(lambda: "expiry pass failed" in caplog.text)
    assert server.server.expiry.running  # a raw sqlite3 error used to end it for good
    monkeypatch.undo()
    assert get(client, sid).session_id == sid


def test_an_unexpected_fault_is_internal_with_error_info_and_a_logged_traceback(server, client, monkeypatch, caplog):
    def bug(*args):
        raise RuntimeError("a bug that must not leak to clients")

    monkeypatch.setattr(reads, "get_flow", bug)
    err = expect_error(client.flows.GetFlow, fpb.GetFlowRequest(flow_id="flw_x"), grpc.StatusCode.INTERNAL, "INTERNAL")
    assert "bug" not in err.message and "traceback" not in err.message.lower()
    assert "a bug that must not leak to clients" in caplog.text  # the details are in the server's log


def test_health_is_not_serving_once_the_expiry_scheduler_has_stopped(server, client):
    stub = health_pb2_grpc.HealthStub(client._channel)
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status == health_pb2.HealthCheckResponse.SERVING
    server.call(server.server.expiry.stop())  # as if it had died: nothing would expire any more
    wait_until(
        lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status
        == health_pb2.HealthCheckResponse.NOT_SERVING
    )


def test_client_watch_sessions_resumes_across_a_restart_and_raises_on_a_foreign_cursor(tmp_path):
    db = tmp_path / "flowsession.db"
    first = ServerProcess(db)
    with connect(first.address) as client:
        flow_id = published_flow(client)
        seed = new_session(client, flow_id).session.session_id
        after = current_cursor(client, seed)
        got = consumed(
            lambda: client.watch_sessions("live", after_cursor=after, timeout=60), lambda e: (e.session.session_id, e.version)
        )
        a = new_session(client, flow_id).session.session_id
        assert got.get(timeout=TIMEOUT) == (a, 1)
        _restarted(first, db, client)
        # Committed while the watcher was away, and after it is back: each arrives once, in order.
        b = new_session(client, flow_id).session.session_id
        report(client, a, "document", "ok")
        assert [got.get(timeout=TIMEOUT) for _ in range(2)] == [(b, 1), (a, 2)]
        # A cursor of another database is a typed error, not a silent skip.
        other = f"{'0' * 16}-{1:016x}"
        with pytest.raises(CursorExpiredError) as info:
            next(client.watch_sessions("live", after_cursor=other, timeout=TIMEOUT))
        assert info.value.oldest_cursor


# A connection that takes in little until it is read from, so a large first write waits for the reader.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]


def _big_sessions(server: ServerThread, count: int) -> list[str]:
    """``count`` sessions of 250 KB inputs: their first watch event outgrows SMALL_WINDOW."""
    with connect(server.address) as client:
        flow_id = published_flow(client)
        big = struct_pb2.Struct()
        big.update({"blob": "x" * 250_000})
        return [new_session(client, flow_id, input=big).session.session_id for _ in range(count)]


@pytest.fixture
def held_write(tmp_path, monkeypatch):
    """A server with 3 sessions of 250 KB inputs; yields (server, session ids, a queue that gets an item
    as each watch-stream write starts). The test stops the server itself."""
    started: queue.Queue = queue.Queue()
    original = streams_module._Sender.send

    async def send(self, message):
        started.put(message)
        await original(self, message)

    monkeypatch.setattr(streams_module._Sender, "send", send)
    server = ServerThread(settings_for(tmp_path))
    try:
        yield server, _big_sessions(server, 3), started
    finally:
        server.stop()


def test_a_cut_stream_whose_client_then_leaves_logs_no_error(tmp_path, caplog):
    # A stream cut because its client read nothing keeps its status behind the message flow control
    # holds back. When that client disconnected, the status failed in grpc.aio before it had seen the
    # client go, and it logged an ERROR with a traceback, for every such client.
    caplog.set_level(logging.INFO, logger="flowsession_server.api.app")
    server = ServerThread(settings_for(tmp_path, watch_write_timeout=0.2))
    try:
        (sid,) = _big_sessions(server, 1)
        with connect(server.address, options=SMALL_WINDOW) as watcher:
            stream = watcher.sessions.WatchSession(spb.WatchSessionRequest(environment="live", session_id=sid), timeout=30)
            wait_until(lambda: "cut 1 watch streams" in caplog.text)
            del stream  # unread: the client leaves with the channel
        wait_until(lambda: open_streams(server) == 0)  # the call is over in gRPC too
    finally:
        server.stop()
    # (About one run in fifty, grpc.aio sees the client go first and logs nothing either way.)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("grpc") and r.levelno >= logging.ERROR] == []


def _shut_down_during_the_write_in_flight(server, stream, session_id: str) -> FlowsessionError:
    """Starts the shutdown while the stream's latest write waits for the reader, reads that write, and
    returns the error the stream then ends with, once the stop has ended (within TIMEOUT, not the 60 s
    grace)."""
    stopping = asyncio.run_coroutine_threadsafe(server.server.stop(60), server.loop)
    wait_until(lambda: server.server.hub.closed)  # the drain is over; streams are being ended
    assert next(stream).event.session.session_id == session_id  # the write in flight arrives
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    stopping.result(TIMEOUT)
    return FlowsessionError.from_rpc_error(info.value)


def test_shutdown_ends_a_stream_whose_first_write_is_still_in_flight(held_write):
    # SIGTERM's shutdown interrupts a stream's first write while it waits for the client to read (flow
    # control). Once the client reads, it must hear SHUTTING_DOWN and the stop must end: the error status
    # used to repeat the write's headers, grpc refused it, and the call hung until the grace ran out.
    server, (sid, *_), started = held_write
    with connect(server.address, options=SMALL_WINDOW) as watcher:
        stream = watcher.sessions.WatchSession(spb.WatchSessionRequest(environment="live", session_id=sid), timeout=30)
        started.get(timeout=TIMEOUT)
        err = _shut_down_during_the_write_in_flight(server, stream, sid)
    assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"), err


@pytest.mark.parametrize("handed_over", [0, 1])
def test_shutdown_while_sending_the_current_sessions_claims_only_what_was_sent(held_write, handed_over):
    # include_current's sessions are older than the stream's "now": a shutdown in their midst must name
    # the last of them handed over (none: no position), not "now", or a client resuming from it would
    # never get the rest.
    server, running, started = held_write
    with connect(server.address, options=SMALL_WINDOW) as watcher:
        request = spb.WatchSessionsRequest(environment="live", include_current=True)
        stream = watcher.sessions.WatchSessions(request, timeout=30)
        sent = []
        for _ in range(handed_over):  # read it, so its write completes and the next one starts
            started.get(timeout=TIMEOUT)
            sent.append(next(stream).event)
        started.get(timeout=TIMEOUT)
        err = _shut_down_during_the_write_in_flight(server, stream, running[handed_over])
    assert err.reason == "SHUTTING_DOWN"
    if sent:
        assert err.metadata["last_cursor"] == sent[-1].cursor
    else:
        assert "last_cursor" not in err.metadata


def test_a_refused_call_leaves_its_error_and_frames_to_no_reference_cycle(client):
    """A refused call once left its domain error, tracebacks and the handler's frames (holding the
    request) in a reference cycle through grpc's AbortError, which only a full collection frees, and
    the server runs those rarely: under a stream of refused calls memory climbed by tens of MB, then
    one collection froze the server for seconds. The collector's garbage is kept here to look at."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(50):
            assert rpc_error(client.flows.GetFlow, fpb.GetFlowRequest(flow_id="flw_nope")).reason == "FLOW_NOT_FOUND"
        gc.collect()
        left = [
            o
            for o in gc.garbage
            if isinstance(o, DomainError) or (type(o).__name__ == "frame" and "flowsession_server" in o.f_code.co_filename)
        ]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


def test_a_closed_watch_stream_leaves_its_watcher_to_no_reference_cycle(server, client):
    """The stream's sender and its hub watcher held each other: every stream's watcher, sender and
    call state waited for a rare full collection after the stream ended."""
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(20):
            stream = client.sessions.WatchSession(spb.WatchSessionRequest(environment="live", session_id=sid), timeout=TIMEOUT)
            assert next(stream).event.version == 1
            stream.cancel()
        wait_until(lambda: watcher_count(server) == 0)
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, (hub_module.Watcher, streams_module._Sender))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


def _request_tasks(loop: asyncio.AbstractEventLoop) -> list[asyncio.Task[Any]]:
    """The aio server's requests for the next call, each pending in gRPC core until it matches one."""
    names = ("AioServer._request_call", "AioServer._request_registered_call")
    return [t for t in asyncio.all_tasks(loop) if getattr(t.get_coro(), "__qualname__", "") in names]


def _completion_fd(loop: Any) -> int:
    """The socket gRPC's poller thread writes a byte to for every completion it queues for the loop."""
    for key in loop._selector.get_map().values():
        reader = key.data[0]
        if reader is not None and getattr(getattr(reader._callback, "func", None), "__name__", "") == "_handle_events":
            return key.fd
    raise AssertionError("gRPC's completion socket is not among the loop's readers")


def test_no_call_is_handed_to_a_request_the_stopping_server_drops(tmp_path):
    """The aio server cancels its pending requests when it stops. With a request pending per registered
    method, one whose match with a call core had already queued for the loop was cancelled: the call never
    reached Python, and core held it until the whole grace had passed and then cancelled it ("Cancelling
    all calls"). The race is set up deterministically: call A completes a request; before the serving loop
    sees it, call B is sent and (if another request is pending to take it) matched by core, and the
    stop (gRPC's part of FlowsessionServer.stop) begins. B then never reached Python: its call was freed
    at once here (bare CANCELLED); in the server, under load, core also held it for the whole grace. Now
    one request is pending at a time and the serving loop takes its answer before it stops, so no other
    request can take B (it is then refused by the stop, as any call arriving at that moment)."""
    running = ServerThread(settings_for(tmp_path))
    grace = 4.0
    loop = running.loop
    send_b = threading.Event()
    stop_began = threading.Event()
    stopping: dict[str, Any] = {}

    def before_the_serving_loop_sees_it(task: asyncio.Task[Any]) -> None:
        # Runs on the server loop, in the same pass as (and before) asyncio.wait's own callback.
        others = [t for t in _request_tasks(loop) if not t.done()]
        stopping["requests"] = len(others)
        fd = _completion_fd(loop)
        if others:
            pending = array.array("i", [0])
            fcntl.ioctl(fd, termios.FIONREAD, pending)
            if pending[0]:
                os.read(fd, pending[0])  # stale wake-ups; the next byte is B's
        send_b.set()
        if others:
            ready, _, _ = select.select([fd], [], [], TIMEOUT)  # core queued B's match for the loop
            assert ready, "core did not hand call B to a pending request"
        stopping["began"] = time.monotonic()
        stopping["task"] = asyncio.ensure_future(running.server.server.stop(grace))
        stopping["task"].add_done_callback(lambda _: stopping.setdefault("ended", time.monotonic()))
        stop_began.set()

    armed: list[asyncio.Task[Any]] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        if not armed and getattr(coro, "__qualname__", "") in ("AioServer._request_call", "AioServer._request_registered_call"):
            armed.append(task)
            task.add_done_callback(before_the_serving_loop_sees_it)
        return task

    try:
        with connect(running.address) as client, ThreadPoolExecutor(1) as pool:
            client.flows.ListFlows(fpb.ListFlowsRequest(), timeout=TIMEOUT)  # connected
            running.call(_set_task_factory(factory))
            client.flows.ListFlows(fpb.ListFlowsRequest(), timeout=TIMEOUT)  # its request, re-issued, is armed
            assert armed

            def call_b() -> tuple[Any, float]:
                assert send_b.wait(TIMEOUT)
                sent = time.monotonic()
                try:
                    client.sessions.GetSession(spb.GetSessionRequest(environment="live", session_id="ses_x"), timeout=TIMEOUT)
                except grpc.RpcError as err:
                    return err, time.monotonic() - sent
                return None, time.monotonic() - sent

            b = pool.submit(call_b)
            client.flows.ListFlows(fpb.ListFlowsRequest(), timeout=TIMEOUT)  # call A: answered within the grace
            assert stop_began.wait(TIMEOUT)
            error, b_took = b.result(TIMEOUT)
            running.call(_wait_for(stopping["task"]))
        answered = error is not None and error.code() == grpc.StatusCode.NOT_FOUND  # by GetSession
        assert answered or not stopping["requests"], (
            f"call B, handed by core to one of {stopping['requests']} other pending requests as the server stopped, "
            f"never reached Python: {error.code() if error else None} {error.details() if error else ''!r}"
        )
        assert b_took < grace / 2, f"call B took {b_took:.2f} s: held by gRPC until the grace ended"
        assert stopping["ended"] - stopping["began"] < grace / 2, "the stop waited out the grace for a call Python never saw"
    finally:
        running.call(_set_task_factory(None))
        running.stop()


async def _set_task_factory(factory: Any) -> None:
    asyncio.get_running_loop().set_task_factory(factory)


async def _wait_for(task: asyncio.Task[Any]) -> None:
    await asyncio.wait_for(asyncio.shield(task), TIMEOUT)


def test_a_second_server_on_an_address_in_use_does_not_start(tmp_path):
    """With gRPC's default SO_REUSEPORT it bound the port too and took half of the connections."""
    first = ServerThread(settings_for(tmp_path))
    (tmp_path / "other").mkdir()

    async def tasks() -> list[str]:
        return sorted(t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task())

    try:
        running = first.call(tasks())
        with pytest.raises(CannotListen, match=f"cannot listen on {first.address}"):
            first.call(build_server(settings_for(tmp_path / "other"), first.address))
        assert first.call(tasks()) == running  # the failed start stopped its store's and loops' tasks
    finally:
        first.stop()
