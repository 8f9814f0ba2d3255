"""Shared test support: a real server on 127.0.0.1:0 in a background event loop, a server in a child
process, flow builders and error assertions."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from flowsession.client import FlowsessionError
from flowsession.v1 import flow_pb2, flow_service_pb2 as fpb, session_service_pb2 as spb
from flowsession_server.api.app import FlowsessionServer, build_server
from flowsession_server.config import Settings

TIMEOUT = 10  # seconds, for every RPC a test makes

ACCEPTED = flow_pb2.SESSION_OUTCOME_ACCEPTED
REJECTED = flow_pb2.SESSION_OUTCOME_REJECTED


class ServerThread:
    """Runs build_server() on its own event loop thread, so tests can use the blocking client."""

    def __init__(self, settings: Settings, **kwargs: Any):
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self._thread.start()
        self.server: FlowsessionServer
        self.server, self.port = self.call(build_server(settings, "127.0.0.1:0", **kwargs))
        self.address = f"127.0.0.1:{self.port}"

    def call(self, coro: Any, timeout: float = TIMEOUT) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        try:
            self.call(self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(TIMEOUT)
            self.loop.close()


def watcher_count(server: ServerThread) -> int:
    """The watch streams the server holds open, read on its loop."""

    async def count() -> int:
        return server.server.hub.watcher_count

    return server.call(count())


def open_streams(server: ServerThread) -> int:
    """The watch streams whose gRPC call is not over (what --max-watchers counts), read on its loop."""

    async def count() -> int:
        return server.server.hub.open_streams

    return server.call(count())


class ServerProcess:
    """`flowsession serve` as a child process (for SIGKILL, SIGTERM and restart tests). Every one started
    is closed (killed if still running) when its test ends, even a failing one: see ``close_all``."""

    started: list[ServerProcess] = []

    @classmethod
    def close_all(cls) -> None:
        while cls.started:
            cls.started.pop().close()

    def __init__(self, db_path: Path, *extra: str, address: str = "127.0.0.1:0", env: dict[str, str] | None = None):
        argv = [sys.executable, "-m", "flowsession_server", "serve"]
        if env is None:
            argv += ["--address", address, "--db", str(db_path)]
        self.proc = subprocess.Popen(
            [*argv, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        ServerProcess.started.append(self)
        line = self._first_line()
        assert line.startswith("listening on "), line
        self.address = line.removeprefix("listening on ").strip()

    def _first_line(self) -> str:
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(TIMEOUT)
        if not result:
            raise AssertionError("server did not report its address in time")
        return result[0]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(TIMEOUT)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server still running {TIMEOUT} s after SIGTERM") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class Blackhole:
    """A loopback TCP proxy to ``upstream`` (HOST:PORT) on its own event loop. ``silence()`` stops
    forwarding on the connections it holds without closing them, as a NAT or proxy that dropped its
    state does: only keepalive can notice. Connections made after it are forwarded again."""

    def __init__(self, upstream: str):
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._links: list[_Link] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-blackhole", daemon=True)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self._links.append(link)
        await asyncio.gather(link.pump(reader, up_writer), link.pump(up_reader, writer))

    def silence(self) -> None:
        async def silence() -> None:
            for link in self._links:
                link.silenced = True

        self._call(silence())

    def close(self) -> None:
        async def close() -> None:
            self._server.close()
            for link in self._links:
                link.abort()
            await asyncio.gather(*self._tasks, return_exceptions=True)  # the pumps end on the aborts

        try:
            self._call(close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(TIMEOUT)
            self.loop.close()


class _Link:
    """One proxied connection: both directions, silenced together."""

    def __init__(self, *writers: asyncio.StreamWriter):
        self._writers = writers
        self.silenced = False

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if not self.silenced:  # read and dropped: the peer's writes still succeed
                    writer.write(data)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        for writer in self._writers:
            writer.transport.abort()


class Gate:
    """Holds one store read on the server's loop until the test opens it: what commits meanwhile is
    published to watchers that are still catching up. The first ``passing`` calls go through unheld."""

    def __init__(self, server: ServerThread, method: str, *, passing: int = 0):
        self.entered = threading.Event()
        self._open = server.call(new_event())
        self._server = server
        store = server.server.store
        original = getattr(store, method)

        async def held(*args, **kwargs):
            nonlocal passing
            if passing:
                passing -= 1
                return await original(*args, **kwargs)
            self.entered.set()
            await self._open.wait()
            return await original(*args, **kwargs)

        setattr(store, method, held)

    def open(self) -> None:
        self._server.loop.call_soon_threadsafe(self._open.set)


async def new_event() -> asyncio.Event:
    return asyncio.Event()


def settings_for(tmp_path: Path, **changes: Any) -> Settings:
    # A short shutdown drain: hundreds of servers stop in the suite, mostly idle ones.
    return replace(Settings(db_path=str(tmp_path / "flowsession.db"), shutdown_drain=0.02), **changes)


# Flow graphs


def step(step_id: str, step_type: str = "check", **routes: str) -> flow_pb2.Step:
    return flow_pb2.Step(step_id=step_id, step_type=step_type, routes=routes)


def end(step_id: str, outcome: int) -> flow_pb2.Step:
    return flow_pb2.Step(step_id=step_id, step_type="end", outcome=outcome)


def kyc_steps() -> list[flow_pb2.Step]:
    """document -> liveness -> accepted; a bad verdict on either -> rejected."""
    return [
        step("document", "document_check", ok="liveness", bad="rejected"),
        step("liveness", "liveness", ok="accepted", bad="rejected", retry="liveness"),
        end("accepted", ACCEPTED),
        end("rejected", REJECTED),
    ]


def published_flow(
    client: Any, *, environment: str = "live", timeout_s: float | None = None, steps: list[flow_pb2.Step] | None = None
) -> str:
    """Creates a flow with one version published to ``environment``; returns its flow_id."""
    flow = client.flows.CreateFlow(fpb.CreateFlowRequest(name="kyc"), timeout=TIMEOUT).flow
    request = fpb.CreateFlowVersionRequest(flow_id=flow.flow_id, start_step_id="document", steps=steps or kyc_steps())
    if timeout_s is not None:
        request.execution_timeout.CopyFrom(duration_pb2.Duration(seconds=int(timeout_s), nanos=int(timeout_s % 1 * 1e9)))
    version = client.flows.CreateFlowVersion(request, timeout=TIMEOUT).flow_version
    client.flows.PublishFlowVersion(
        fpb.PublishFlowVersionRequest(flow_id=flow.flow_id, version=version.version, environment=environment),
        timeout=TIMEOUT,
    )
    return flow.flow_id


def new_session(client: Any, flow_id: str, environment: str = "live", **fields: Any) -> spb.CreateSessionResponse:
    return client.sessions.CreateSession(
        spb.CreateSessionRequest(flow_id=flow_id, environment=environment, **fields), timeout=TIMEOUT
    )


def rpc_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> FlowsessionError:
    """Calls fn, expects it to fail, and returns the failure with its rich details parsed."""
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, timeout=TIMEOUT, **kwargs)
    return FlowsessionError.from_rpc_error(info.value)


def expect_error(
    fn: Callable[..., Any],
    request: Any,
    code: grpc.StatusCode,
    reason: str | None = None,
    fields: tuple[str, ...] = (),
    prefix_fields: tuple[str, ...] = (),
) -> FlowsessionError:
    """Calls fn(request) and expects ``code`` with exactly one ErrorInfo of domain "flowsession" and a
    reason (``reason`` if given); every name in ``fields`` must be a field violation, and each of
    ``prefix_fields`` the start of one (for paths like ``statuses[0]``)."""
    with pytest.raises(grpc.RpcError) as info:
        fn(request, timeout=TIMEOUT)
    raw = info.value
    assert raw.code() is code, (raw.code(), raw.details())
    status = rpc_status.from_call(raw)
    assert status is not None, "no google.rpc.Status in the trailers"
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1, status
    err = FlowsessionError.from_rpc_error(raw)
    error_info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(error_info)
    assert error_info.domain == "flowsession", error_info
    assert err.reason, err
    if reason is not None:
        assert err.reason == reason, err
    violated = [f for f, _ in err.field_violations]
    for field in fields:
        assert field in violated, (field, err.field_violations)
    for field in prefix_fields:
        assert any(v.startswith(field) for v in violated), (field, err.field_violations)
    assert all(description for _, description in err.field_violations), err.field_violations
    return err


def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT, interval: float = 0.01) -> Any:
    """Waits for a condition with a deadline (re-checking it), for state no stream reports."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        threading.Event().wait(interval)


def report(client: Any, session_id: str, step_id: str, verdict: str, environment: str = "live", **fields: Any):
    return client.sessions.ReportStepResult(
        spb.ReportStepResultRequest(environment=environment, session_id=session_id, step_id=step_id, verdict=verdict, **fields),
        timeout=TIMEOUT,
    ).session


def get(client: Any, session_id: str, environment: str = "live"):
    return client.sessions.GetSession(
        spb.GetSessionRequest(environment=environment, session_id=session_id), timeout=TIMEOUT
    ).session


def watch_raw(client: Any, session_id: str, after_version: int = 0, environment: str = "live") -> list[Any]:
    """All events of one WatchSession stream until the server ends it with OK."""
    stream = client.sessions.WatchSession(
        spb.WatchSessionRequest(environment=environment, session_id=session_id, after_version=after_version),
        timeout=TIMEOUT,
    )
    return [r.event for r in stream]


def first_events(client: Any, session_id: str, count: int, after_version: int = 0, environment: str = "live") -> list[Any]:
    """The first ``count`` events of a WatchSession stream (for sessions still RUNNING); then cancels it."""
    stream = client.sessions.WatchSession(
        spb.WatchSessionRequest(environment=environment, session_id=session_id, after_version=after_version),
        timeout=TIMEOUT,
    )
    try:
        return [next(stream).event for _ in range(count)]
    finally:
        stream.cancel()


def current_cursor(client: Any, session_id: str, environment: str = "live") -> str:
    """The cursor of the session's latest event: a WatchSessions resume point that misses nothing after it,
    however late the stream opens."""
    stream = client.sessions.WatchSession(
        spb.WatchSessionRequest(environment=environment, session_id=session_id), timeout=TIMEOUT
    )
    try:
        return next(stream).event.cursor
    finally:
        stream.cancel()
