"""Child processes of the bench: servers (flowsession and bare) and client workers.

Every process is registered in a ``Processes`` set and stopped by ``Processes.stop_all()`` (SIGTERM,
then SIGKILL after a grace period), which the orchestrator calls in a ``finally``. Children also get
PR_SET_PDEATHSIG, so even a bench killed with SIGKILL takes them down with it.
"""
from __future__ import annotations

import asyncio
import ctypes
import itertools
import json
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

READY_TIMEOUT = 30.0
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


REPO = Path(__file__).resolve().parent.parent


SERVER_ENV_PREFIX = "FLOWSESSION_"  # `flowsession serve` reads every flag's default from FLOWSESSION_<FLAG>


def child_env() -> dict[str, str]:
    """The bench's own environment, plus the repository on the path so ``-m bench.worker`` resolves
    from any working directory (an existing PYTHONPATH keeps precedence). Without the FLOWSESSION_*
    variables: a FLOWSESSION_SYNCHRONOUS=NORMAL (or _WATCH_HEARTBEAT, _FEED_POLL, ...) in the shell that
    runs `make bench` would otherwise change the servers measured while the results say default flags."""
    path = os.environ.get("PYTHONPATH", "")
    env = {k: v for k, v in os.environ.items() if not k.startswith(SERVER_ENV_PREFIX)}
    return {**env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{path}{os.pathsep}{REPO}" if path else str(REPO)}


def ignored_server_env() -> list[str]:
    """The FLOWSESSION_* variables set here that child_env() keeps from the servers (for the results)."""
    return sorted(k for k in os.environ if k.startswith(SERVER_ENV_PREFIX))


class Child:
    def __init__(self, name: str, proc: asyncio.subprocess.Process, log_path: Path):
        self.name = name
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``grace`` s, then SIGKILL."""
        if self.proc.returncode is not None:
            return self.proc.returncode
        try:
            self.proc.terminate()
            return await asyncio.wait_for(self.proc.wait(), grace)
        except ProcessLookupError:
            return self.proc.returncode
        except TimeoutError:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            return await self.proc.wait()


class Processes:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.children: list[Child] = []
        self._names = itertools.count()

    async def spawn(self, name: str, argv: list[str], **kwargs: Any) -> Child:
        log_path = self.log_dir / f"{next(self._names):02d}-{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - the child owns it
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stderr=log,
                env=child_env(),
                preexec_fn=die_with_parent,
                limit=256 * 1024 * 1024,
                **kwargs,
            )
        finally:
            log.close()
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    async def stop_all(self) -> None:
        # Workers first (they hold streams), then servers; each bounded by its own grace period.
        workers = [c for c in self.children if isinstance(c, WorkerProc)]
        others = [c for c in self.children if not isinstance(c, WorkerProc)]
        for group in (workers, others):
            await asyncio.gather(*(c.stop() for c in group), return_exceptions=True)
        self.children = [c for c in self.children if c.proc.returncode is None]


class ServerProc(Child):
    """A server child that prints ``listening on HOST:PORT`` on stdout; stdout is drained afterwards."""

    address: str
    gc_path: Path | None = None
    listening_us: int = 0  # wall clock (µs) when its "listening on" line was read
    started_s: float = 0.0  # spawn -> that line
    _drain: asyncio.Task[None]

    @classmethod
    async def start(cls, procs: Processes, name: str, argv: list[str]) -> ServerProc:
        t0 = time.monotonic()
        base = await procs.spawn(name, argv, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
        self = cls(base.name, base.proc, base.log_path)
        procs.children[-1] = self
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), READY_TIMEOUT)
        except TimeoutError:
            line = b""
        self.listening_us = time.time_ns() // 1000
        self.started_s = time.monotonic() - t0
        text = line.decode(errors="replace").strip()
        if not text.startswith("listening on "):
            await self.stop(2)
            raise RuntimeError(f"{name} did not start (first line {text!r}); log:\n{self.log_tail()}")
        self.address = text.removeprefix("listening on ")
        self._drain = asyncio.create_task(self._drain_stdout())
        return self

    async def _drain_stdout(self) -> None:
        assert self.proc.stdout is not None
        while await self.proc.stdout.readline():
            pass

    async def stop(self, grace: float = 15.0) -> int | None:
        code = await super().stop(grace)
        return code


def _probed(gc_path: Path, module: str) -> list[str]:
    """Runs ``module`` under bench.gc_probe, which times every garbage collection of the server."""
    return [sys.executable, "-m", "bench.gc_probe", str(gc_path), module]


def free_port() -> int:
    """A loopback port nothing is bound to, below the ephemeral range (so no client socket of this run
    takes it as its local port while the server on it is down between a stop and a start)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(max(1025, low - 12_000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # fall back to one the kernel picks
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flowsession_argv(db: Path, gc_path: Path, address: str, *extra: str) -> list[str]:
    """``flowsession serve`` under the probe; durable throughput is specified at synchronous FULL, so it
    is passed explicitly rather than left to a default."""
    serve = ["serve", "--address", address, "--db", str(db), "--synchronous", "FULL", "--log-level", "WARNING"]
    return [*_probed(gc_path, "flowsession_server"), *serve, *extra]


async def start_flowsession(
    procs: Processes, db: Path, *extra: str, address: str = "127.0.0.1:0", gc_path: Path | None = None
) -> ServerProc:
    gc_path = gc_path or db.with_suffix(".gc.jsonl")
    server = await ServerProc.start(procs, "flowsession", flowsession_argv(db, gc_path, address, *extra))
    server.gc_path = gc_path
    return server


async def start_bare(procs: Processes, payload: int, gc_path: Path) -> ServerProc:
    argv = [*_probed(gc_path, "bench.bare_server"), "--address", "127.0.0.1:0", "--payload", str(payload)]
    server = await ServerProc.start(procs, "bare", argv)
    server.gc_path = gc_path
    return server


class WorkerError(RuntimeError):
    pass


class WorkerProc(Child):
    """A ``python -m bench.worker`` child, driven by JSON lines."""

    _reader: asyncio.Task[None]

    @classmethod
    async def start(cls, procs: Processes, name: str) -> WorkerProc:
        base = await procs.spawn(
            name, [sys.executable, "-m", "bench.worker"], stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        self = cls(base.name, base.proc, base.log_path)
        procs.children[-1] = self
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._reader = asyncio.create_task(self._read())
        await self.call("ping", call_timeout=READY_TIMEOUT)
        return self

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                message = json.loads(line)
                fut = self._pending.pop(message["id"], None)
                if fut is None or fut.done():
                    continue
                if message["ok"]:
                    fut.set_result(message["result"])
                else:
                    fut.set_exception(WorkerError(f"{self.name}: {message['error']}\n{message.get('trace', '')}"))
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(WorkerError(f"{self.name} exited; log:\n{self.log_tail()}"))
            self._pending.clear()

    async def call(self, cmd: str, *, call_timeout: float = 120.0, **args: Any) -> Any:
        """Runs ``cmd`` in the worker and returns its result; every call is bounded by ``timeout``."""
        if self.proc.returncode is not None or self._reader.done():
            raise WorkerError(f"{self.name} is not running; log:\n{self.log_tail()}")
        request_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = fut
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"id": request_id, "cmd": cmd, "args": args}) + "\n").encode())
        await self.proc.stdin.drain()
        try:
            return await asyncio.wait_for(fut, call_timeout)
        except TimeoutError:
            raise WorkerError(f"{self.name}: {cmd} took longer than {call_timeout} s") from None

    async def stop(self, grace: float = 10.0) -> int | None:
        if self.proc.returncode is None and self.proc.stdin is not None and not self.proc.stdin.is_closing():
            try:  # ask politely first: the worker closes its channels and exits
                self.proc.stdin.write(b'{"id": 0, "cmd": "exit"}\n')
                await self.proc.stdin.drain()
                self.proc.stdin.close()
                return await asyncio.wait_for(self.proc.wait(), 5)
            except (TimeoutError, ConnectionError, BrokenPipeError):
                pass
        return await super().stop(grace)
