"""A load-generating client process: ``python -m bench.worker``.

The orchestrator (bench/run.py) starts several of these and talks to each over stdin/stdout, one JSON
object per line: ``{"id": 1, "cmd": "watch_open", "args": {...}}`` in, ``{"id": 1, "ok": true,
"result": ...}`` (or ``"ok": false, "error": "..."``) out. Commands run concurrently on one asyncio
loop, so one process holds thousands of grpc.aio streams while it answers further commands.

Every wall-clock figure is ``time.time_ns() // 1000`` (µs); the server runs on the same machine, so a
server ``event_time`` and a client receipt time are on the same clock.
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import json
import random
import resource
import struct
import sys
import threading
import time
import traceback
from typing import Any, Awaitable, Callable, Sequence

import grpc
from google.protobuf import duration_pb2

from flowsession.v1 import flow_pb2, flow_service_pb2 as fpb, flow_service_pb2_grpc
from flowsession.v1 import session_pb2, session_service_pb2 as spb, session_service_pb2_grpc

try:  # the client facade's keepalive settings, so the bench's channels behave like real clients'
    from flowsession.client import KEEPALIVE_OPTIONS
except ImportError:  # pragma: no cover - the facade is part of the same distribution
    KEEPALIVE_OPTIONS = []

try:  # the facade's resume rules: which failures it resumes from, and its jittered exponential backoff
    from flowsession.client import FlowsessionError, _backoff, _resumable

    FACADE_RESUME = "flowsession.client (FlowsessionError.from_rpc_error, _resumable, _backoff)"
except ImportError:  # pragma: no cover - the facade is part of the same distribution
    FlowsessionError = None  # type: ignore[assignment,misc]
    FACADE_RESUME = "bench fallback (facade not importable)"

    def _backoff(attempt: int) -> float:
        return random.uniform(0.0, min(5.0, 0.05 * 2 ** (attempt - 1)))

    def _resumable(error: Any) -> bool:
        return error.code is grpc.StatusCode.UNAVAILABLE or error.reason in ("WATCHER_TOO_SLOW", "TOO_MANY_WATCHERS")

ENV = "live"
RPC_TIMEOUT = 30.0
OPEN_PENDING = 128  # per worker; the server sheds opens beyond its --max-opening-watchers (256) anyway
OPEN_ATTEMPTS = 50
STEP = "liveness"
_STAMP = struct.Struct("<q")
STEP_COMPLETED = session_pb2.SESSION_EVENT_TYPE_STEP_COMPLETED
EXPIRED = session_pb2.SESSION_EVENT_TYPE_EXPIRED


def now_us() -> int:
    return time.time_ns() // 1000


def ts_us(ts: Any) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def _identity(data: bytes) -> bytes:
    return data


def _retry_delay(exc: grpc.aio.AioRpcError) -> float:
    """The server's google.rpc.RetryInfo delay, else a jittered 50-500 ms."""
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(exc)
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return max(0.01, info.retry_delay.ToTimedelta().total_seconds())
    except Exception:  # noqa: BLE001 - no usable details: fall back to jitter
        pass
    return random.uniform(0.05, 0.5)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Errors:
    """Counts failed RPCs by status code name."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def add(self, exc: BaseException) -> None:
        if isinstance(exc, grpc.aio.AioRpcError):
            self.counts[exc.code().name] += 1
        else:
            self.counts[type(exc).__name__] += 1

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)


async def closed_loop(
    action: Callable[[Any], Awaitable[Any]],
    items: Sequence[Any],
    *,
    inflight: int,
    duration: float | None = None,
    count: int | None = None,
) -> dict[str, Any]:
    """``inflight`` callers, each issuing the next call as soon as its last one answered."""
    errors = Errors()
    done = 0
    next_index = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = None if duration is None else start + duration

    async def caller() -> None:
        nonlocal done, next_index
        while True:
            if deadline is not None and loop.time() >= deadline:
                return
            if count is not None and next_index >= count:
                return
            item = items[next_index % len(items)] if items else next_index
            next_index += 1
            try:
                await action(item)
                done += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.add(exc)

    await asyncio.gather(*(caller() for _ in range(inflight)))
    elapsed = loop.time() - start
    return {"done": done, "elapsed": elapsed, "rate": done / elapsed if elapsed else 0.0, "errors": errors.as_dict()}


async def paced(
    action: Callable[[Any], Awaitable[Any]],
    items: Sequence[Any],
    *,
    rate: float,
    duration: float,
    max_outstanding: int = 2000,
) -> dict[str, Any]:
    """Open loop: one call every 1/rate s on a fixed schedule (calls overlap freely), over ``items``
    round-robin. A tick finding ``max_outstanding`` calls still open is skipped and counted."""
    loop = asyncio.get_running_loop()
    errors = Errors()
    total = int(rate * duration)
    outstanding: set[asyncio.Task[Any]] = set()
    done_items: collections.Counter[str] = collections.Counter()
    skipped = 0
    max_behind = 0.0

    async def one(item: Any) -> None:
        try:
            await action(item)
            done_items[item if isinstance(item, str) else str(item)] += 1
        except Exception as exc:  # noqa: BLE001
            errors.add(exc)

    start = loop.time()
    for i in range(total):
        target = start + i / rate
        delay = target - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # the schedule itself: pacing, not synchronisation
        else:
            max_behind = max(max_behind, -delay)
        if len(outstanding) >= max_outstanding:
            skipped += 1
            continue
        task = asyncio.create_task(one(items[i % len(items)]))
        outstanding.add(task)
        task.add_done_callback(outstanding.discard)
    send_elapsed = loop.time() - start
    if outstanding:
        await asyncio.wait(list(outstanding), timeout=RPC_TIMEOUT + 5)
    elapsed = loop.time() - start
    made = sum(done_items.values())
    return {
        "planned": total,
        "done": made,
        "skipped": skipped,
        "send_elapsed": send_elapsed,
        "elapsed": elapsed,
        "rate": made / send_elapsed if send_elapsed else 0.0,
        "max_behind_s": max_behind,
        "errors": errors.as_dict(),
        "per_item": dict(done_items),
    }


class Group:
    """Streams opened by one command: resolves when every one has received its first message."""

    def __init__(self, expected: int):
        self.expected = expected
        self.ready = 0
        self.failed = 0
        self.all_in = asyncio.Event()
        if expected == 0:
            self.all_in.set()

    def settle(self, ok: bool) -> None:
        if ok:
            self.ready += 1
        else:
            self.failed += 1
        if self.ready + self.failed >= self.expected:
            self.all_in.set()


class Counter:
    """A count that can be awaited to reach a value."""

    def __init__(self) -> None:
        self.value = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def add(self, n: int = 1) -> None:
        self.value += n
        if self._waiters:
            still = []
            for target, fut in self._waiters:
                if self.value >= target:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    still.append((target, fut))
            self._waiters = still

    def reset(self) -> None:
        self.value = 0

    async def wait_for(self, target: int, timeout: float) -> bool:
        if self.value >= target:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return False


class Follow:
    """The state of one facade-style follower."""

    __slots__ = ("session_id", "last", "live", "lost", "call", "task", "broke_us", "back_us", "failed_reopens",
                 "gaps", "dups", "recording", "delivered", "version_at_mark")  # fmt: skip

    def __init__(self, session_id: str):
        self.session_id = session_id
        self.last = 0  # the last version delivered
        self.live = False  # the first open has answered
        self.lost = ""  # why the watch ended for good (the facade would have raised), "" while it lives
        self.call: Any = None
        self.task: asyncio.Task[None] | None = None
        self.broke_us: int | None = None  # the restart ended its live stream
        self.back_us: int | None = None  # the first answer of a re-open after that
        self.failed_reopens = 0
        self.gaps = 0
        self.dups = 0
        self.recording = False
        self.delivered: list[int] = []
        self.version_at_mark = 0


class Worker:
    def __init__(self) -> None:
        self.channels: list[grpc.aio.Channel] = []
        self.flow_stubs: list[flow_service_pb2_grpc.FlowServiceStub] = []
        self.session_stubs: list[session_service_pb2_grpc.SessionServiceStub] = []
        self.bare_calls: list[dict[str, Any]] = []
        self._rr = 0
        self.streams: dict[int, tuple[Any, asyncio.Task[None], str]] = {}  # seq -> (call, reader, key)
        self._stream_seq = 0
        self.recording = False
        self.latencies_ms: list[float] = []
        self.received = Counter()  # events (after each stream's first) since the last mark
        self.expired: list[list[Any]] = []  # [session_id, expire_us, event_us, receipt_us, came_first]
        self.expired_count = Counter()
        self.stream_errors = Errors()
        self.last_stream_error = ""
        self.open_retries = 0
        self.reopening: set[asyncio.Task[None]] = set()
        self.pollers: list[asyncio.Task[None]] = []
        self.poll_stop_event = asyncio.Event()
        self.poll_stats: dict[str, Any] = {}
        self.learned = Counter()
        # Streams opened but not yet answered. A burst of thousands of opens overflows the server's
        # queue of calls not yet picked up by the application: grpc core cancels the excess with a bare
        # CANCELLED once more than grpc.server.max_pending_requests (default 1,000; all of them past
        # grpc.server.max_pending_requests_hard_limit, default 3,000) are waiting. So each worker keeps
        # at most this many opens pending and awaits the rest. The restart phase's re-opens do not: a
        # reconnect storm is exactly such a burst.
        self.open_slots = asyncio.Semaphore(OPEN_PENDING)
        # facade-style followers (the restart phase): session_id -> its state
        self.follows: dict[str, Follow] = {}
        self.follow_restarting = False  # set by follow_mark_restart: failures from then on are the restart's
        self.follow_live = Counter()  # followers whose first stream answered
        self.follow_settled = Counter()  # after the restart mark: followers back or given up
        self.follow_delivered = Counter()  # events delivered since follow_mark_changes
        self.follow_counts: dict[str, collections.Counter[str]] = {}
        self.follow_samples: dict[str, str] = {}
        self.channel_states: list[list[list[Any]]] = []
        self.channel_watch: list[asyncio.Task[None]] = []
        self._reset_follow_counts()

    # channels

    def _next(self) -> int:
        self._rr = (self._rr + 1) % len(self.channels)
        return self._rr

    async def connect(self, target: str, channels: int = 1) -> dict[str, Any]:
        await self.close_all()
        for i in range(channels):
            # A local subchannel pool and a distinct argument give every channel its own HTTP/2 connection.
            options = [*KEEPALIVE_OPTIONS, ("grpc.use_local_subchannel_pool", 1), ("bench.channel_index", i)]
            ch = grpc.aio.insecure_channel(target, options=options)
            self.channels.append(ch)
        await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in self.channels)), 15)
        self.flow_stubs = [flow_service_pb2_grpc.FlowServiceStub(ch) for ch in self.channels]
        self.session_stubs = [session_service_pb2_grpc.SessionServiceStub(ch) for ch in self.channels]
        self.bare_calls = [
            {
                "echo": ch.unary_unary("/bench.Bare/Echo", request_serializer=_identity, response_deserializer=_identity),
                "publish": ch.unary_unary(
                    "/bench.Bare/Publish", request_serializer=_identity, response_deserializer=_identity
                ),
                "publish_all": ch.unary_unary(
                    "/bench.Bare/PublishAll", request_serializer=_identity, response_deserializer=_identity
                ),
                "watch": ch.unary_stream("/bench.Bare/Watch", request_serializer=_identity, response_deserializer=_identity),
            }
            for ch in self.channels
        ]
        return {"channels": len(self.channels)}

    async def close_all(self) -> dict[str, Any]:
        await self.follow_close()
        await self.watch_close()
        await self.poll_stop()
        for ch in self.channels:
            await ch.close()
        self.channels = []
        return {}

    # flows and sessions

    async def create_flows(self, timeouts_s: list[float | None], inflight: int = 16) -> list[str]:
        """One published flow per timeout: start step "liveness" routes back to itself on "retry"."""
        steps = [
            flow_pb2.Step(step_id=STEP, step_type="liveness", routes={"retry": STEP, "ok": "accepted"}),
            flow_pb2.Step(step_id="accepted", step_type="end", outcome=flow_pb2.SESSION_OUTCOME_ACCEPTED),
        ]
        ids: list[str | None] = [None] * len(timeouts_s)

        async def make(i: int) -> None:
            stub = self.flow_stubs[self._next()]
            flow = (await stub.CreateFlow(fpb.CreateFlowRequest(name=f"bench-{i}"), timeout=RPC_TIMEOUT)).flow
            request = fpb.CreateFlowVersionRequest(flow_id=flow.flow_id, start_step_id=STEP, steps=steps)
            t = timeouts_s[i]
            if t is not None:
                request.execution_timeout.CopyFrom(duration_pb2.Duration(seconds=int(t), nanos=round(t % 1 * 1e9)))
            version = (await stub.CreateFlowVersion(request, timeout=RPC_TIMEOUT)).flow_version
            await stub.PublishFlowVersion(
                fpb.PublishFlowVersionRequest(flow_id=flow.flow_id, version=version.version, environment=ENV),
                timeout=RPC_TIMEOUT,
            )
            ids[i] = flow.flow_id

        result = await closed_loop(make, list(range(len(timeouts_s))), inflight=inflight, count=len(timeouts_s))
        if result["errors"]:
            raise RuntimeError(f"creating flows failed: {result['errors']}")
        return [i for i in ids if i is not None]

    async def _create(self, flow_id: str) -> spb.CreateSessionResponse:
        stub = self.session_stubs[self._next()]
        return await stub.CreateSession(spb.CreateSessionRequest(flow_id=flow_id, environment=ENV), timeout=RPC_TIMEOUT)

    async def create_sessions(
        self, flow_id: str, inflight: int, count: int | None = None, duration: float | None = None, return_ids: bool = True
    ) -> dict[str, Any]:
        ids: list[str] = []

        async def one(_: Any) -> None:
            ids.append((await self._create(flow_id)).session.session_id)

        result = await closed_loop(one, [], inflight=inflight, count=count, duration=duration)
        if return_ids:
            result["ids"] = ids
        return result

    async def _report(self, session_id: str) -> None:
        stub = self.session_stubs[self._next()]
        await stub.ReportStepResult(
            spb.ReportStepResultRequest(environment=ENV, session_id=session_id, step_id=STEP, verdict="retry"),
            timeout=RPC_TIMEOUT,
        )

    async def changes_closed(self, ids: list[str], inflight: int, duration: float) -> dict[str, Any]:
        order = list(ids)
        random.shuffle(order)
        return await closed_loop(self._report, order, inflight=inflight, duration=duration)

    async def changes_paced(self, ids: list[str], rate: float, duration: float) -> dict[str, Any]:
        return await paced(self._report, ids, rate=rate, duration=duration)

    # WatchSession streams

    async def _start_stream(self, session_id: str, group: Group, attempt: int = 1) -> None:
        await self.open_slots.acquire()
        stub = self.session_stubs[self._next()]
        call = stub.WatchSession(spb.WatchSessionRequest(environment=ENV, session_id=session_id))
        self._stream_seq += 1
        key = self._stream_seq
        task = asyncio.create_task(self._read_stream(key, session_id, call, group, attempt))
        self.streams[key] = (call, task, session_id)

    async def _reopen(self, session_id: str, group: Group, attempt: int, delay: float) -> None:
        await asyncio.sleep(delay)  # the back-off the server asked for (RetryInfo), as a real client does
        await self._start_stream(session_id, group, attempt)

    async def _read_stream(self, key: int, session_id: str, call: Any, group: Group, attempt: int) -> None:
        first = True
        retry_in: float | None = None
        try:
            async for response in call:
                receipt = now_us()
                if not response.HasField("event"):
                    continue  # a heartbeat
                event = response.event
                if event.type == EXPIRED:
                    self.expired.append(
                        [session_id, ts_us(event.session.expire_time), ts_us(event.event_time), receipt, first]
                    )
                    self.expired_count.add()
                if first:
                    first = False
                    self.open_slots.release()
                    group.settle(True)
                    continue
                if self.recording:
                    self.latencies_ms.append((receipt - ts_us(event.event_time)) / 1000.0)
                self.received.add()
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            if first and exc.code() is grpc.StatusCode.UNAVAILABLE and attempt < OPEN_ATTEMPTS:
                retry_in = _retry_delay(exc)  # shed while opening (SERVER_BUSY): open again later
                self.open_retries += 1
            elif not (exc.code() is grpc.StatusCode.CANCELLED and call.cancelled()):
                self.stream_errors.add(exc)
                self.last_stream_error = f"{exc.code().name}: {exc.details()}"
        except Exception as exc:  # noqa: BLE001
            self.stream_errors.add(exc)
            self.last_stream_error = repr(exc)
        finally:
            if first:
                self.open_slots.release()
                if retry_in is None:
                    group.settle(False)
                else:
                    task = asyncio.create_task(self._reopen(session_id, group, attempt + 1, retry_in))
                    self.reopening.add(task)
                    task.add_done_callback(self.reopening.discard)
            self.streams.pop(key, None)

    async def watch_open(self, ids: list[str], timeout: float = 120.0) -> dict[str, Any]:
        return await self._open_all(ids, self._start_stream, timeout)

    async def _open_all(self, keys: list[str], start_one: Any, timeout: float) -> dict[str, Any]:
        """Starts one stream per key and waits (bounded) until each is live or has failed."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        group = Group(len(keys))
        for key in keys:
            await start_one(key, group)
        try:
            await asyncio.wait_for(group.all_in.wait(), timeout)
        except TimeoutError:
            pass
        return {"ready": group.ready, "failed": group.failed, "elapsed": loop.time() - start, "open": len(self.streams)}

    async def watch_close(self, keep: list[str] | None = None) -> dict[str, Any]:
        """Cancels every stream but those of the ``keep`` keys; waits until their readers have ended."""
        kept = set(keep or ())
        for task in list(self.reopening):
            task.cancel()
        tasks = []
        for call, task, name in list(self.streams.values()):
            if name in kept:
                continue
            call.cancel()
            tasks.append(task)
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        return {"closed": len(tasks), "open": len(self.streams)}

    async def watch_mark(self, recording: bool) -> dict[str, Any]:
        self.recording = recording
        self.latencies_ms = []
        self.received.reset()
        return {}

    async def wait_received(self, count: int, timeout: float) -> dict[str, Any]:
        reached = await self.received.wait_for(count, timeout)
        return {"reached": reached, "received": self.received.value}

    async def watch_collect(self) -> dict[str, Any]:
        return {
            "latencies_ms": self.latencies_ms,
            "received": self.received.value,
            "open": len(self.streams),
            "stream_errors": self.stream_errors.as_dict(),
            "last_stream_error": self.last_stream_error,
            "open_retries": self.open_retries,
        }

    # Facade-style followers: the restart phase

    def _reset_follow_counts(self) -> None:
        self.follow_counts = {k: collections.Counter() for k in ("initial_failures", "stream_ends", "reopen_failures")}
        self.follow_samples = {}
        self.follow_failure_times: dict[str, list[int]] = {}  # failed re-opens after the restart mark, by key

    async def _follow(self, f: Follow) -> None:
        """One watcher, resumed the way flowsession.client.Client.watch() does it: on a resumable failure
        (the facade's _resumable: UNAVAILABLE, WATCHER_TOO_SLOW, TOO_MANY_WATCHERS) re-open after the
        server's RetryInfo delay, else after the facade's _backoff (tenacity's full-jitter exponential
        wait) for the n-th consecutive failed open; wait_for_ready=True, no deadline; any other failure
        ends the watch (the facade raises it). Before the restart mark (setting up), CANCELLED is retried
        too, and initial opens take one of the worker's OPEN_PENDING slots like every other phase.

        Re-opens ask for after_version = last - 1, not last: resuming exactly after the last version
        gets no message until the next change or the 30 s heartbeat, so "back" could not be seen. One
        version earlier, the server replays that boundary event (version == last, checked), which is
        dropped as the facade drops any event.version <= last_version; later events must be last + 1."""
        attempts = 0  # consecutive failed opens (the backoff's exponent), as in the facade
        while True:
            slot = not f.live  # the initial open: bounded like every other phase's opens
            if slot:
                await self.open_slots.acquire()
            after = f.last - 1 if f.last > 1 else 0  # 0: the current state (the session's latest event)
            boundary = f.last  # the version the first event of this open must repeat (0: none)
            stub = self.session_stubs[self._next()]
            call = stub.WatchSession(
                spb.WatchSessionRequest(environment=ENV, session_id=f.session_id, after_version=after),
                wait_for_ready=True,
            )
            f.call = call
            answered = False
            try:
                async for response in call:
                    receipt = now_us()
                    if not answered:
                        answered = True
                        attempts = 0
                        if slot:
                            slot = False
                            self.open_slots.release()
                        self._follow_answered(f, receipt)
                    if not response.HasField("event"):
                        continue  # a heartbeat
                    version = response.event.version
                    if version <= f.last:
                        if version == boundary:
                            boundary = 0  # the one replay asked for
                        else:
                            f.dups += 1
                        continue
                    boundary = 0
                    if f.last and version != f.last + 1:
                        f.gaps += 1
                    f.last = version
                    if f.recording:
                        f.delivered.append(version)
                        self.follow_delivered.add()
                self._follow_lost(f, "ended with OK")  # the facade's iterator would end here
                return
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                key, error = self._follow_error(exc)
                restarting = self.follow_restarting
                if answered:
                    self.follow_counts["stream_ends"][key] += 1
                    if restarting and f.broke_us is None:
                        f.broke_us = now_us()
                elif restarting:
                    self.follow_counts["reopen_failures"][key] += 1
                    times = self.follow_failure_times.setdefault(key, [])
                    if len(times) < 20_000:
                        times.append(now_us())
                    if f.broke_us is not None and f.back_us is None:
                        f.failed_reopens += 1
                else:
                    self.follow_counts["initial_failures"][key] += 1
                retry = _resumable(error) or (not restarting and exc.code() is grpc.StatusCode.CANCELLED)
                if not retry:
                    self._follow_lost(f, key)
                    return
                attempts += 1
                retry_delay = getattr(error, "retry_delay", None)
                delay = retry_delay if retry_delay is not None else _backoff(attempts)
            except Exception as exc:  # noqa: BLE001 - the facade would raise it
                self._follow_lost(f, type(exc).__name__)
                self.follow_samples.setdefault(type(exc).__name__, repr(exc)[:400])
                return
            finally:
                if slot:
                    self.open_slots.release()
                f.call = None
            await asyncio.sleep(delay)  # the wait itself: RetryInfo or the facade's backoff

    def _follow_error(self, exc: grpc.aio.AioRpcError) -> tuple[str, Any]:
        """``CODE/REASON`` (``CODE`` alone when the status has no ErrorInfo: not from flowsession code)."""
        if FlowsessionError is not None:
            error = FlowsessionError.from_rpc_error(exc)
        else:  # pragma: no cover
            error = type("E", (), {"code": exc.code(), "reason": "", "retry_delay": _retry_delay(exc)})()
        key = f"{exc.code().name}/{error.reason}" if error.reason else exc.code().name
        if not error.reason and key not in self.follow_samples:
            debug = getattr(exc, "debug_error_string", lambda: "")()
            self.follow_samples[key] = f"details={exc.details()!r} debug={debug[:300]!r}"
        return key, error

    def _follow_answered(self, f: Follow, receipt: int) -> None:
        if not f.live:
            f.live = True
            self.follow_live.add()
        elif f.broke_us is not None and f.back_us is None:
            f.back_us = receipt
            self.follow_settled.add()

    def _follow_lost(self, f: Follow, why: str) -> None:
        f.lost = why
        if not f.live:
            self.follow_live.add()  # settled, as a failure
        elif self.follow_restarting and f.back_us is None:
            self.follow_settled.add()

    async def follow_open(self, ids: list[str], timeout: float = 120.0) -> dict[str, Any]:
        """One facade-style follower per session; returns once every one has its first event."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        target = self.follow_live.value + len(ids)
        for session_id in ids:
            f = Follow(session_id)
            self.follows[session_id] = f
            f.task = asyncio.create_task(self._follow(f))
        await self.follow_live.wait_for(target, timeout)
        live = sum(1 for i in ids if self.follows[i].live and not self.follows[i].lost)
        return {"ready": live, "failed": len(ids) - live, "elapsed": loop.time() - start,
                "initial_failures": dict(self.follow_counts["initial_failures"]),
                "lost": [self.follows[i].lost for i in ids if self.follows[i].lost][:5]}  # fmt: skip

    async def follow_mark_restart(self) -> dict[str, Any]:
        """From now on failures are the restart's; also records every channel's connectivity changes."""
        self.follow_restarting = True
        self.follow_settled.reset()
        self.channel_states = [[] for _ in self.channels]

        async def watch(i: int, ch: grpc.aio.Channel) -> None:
            state = ch.get_state()
            self.channel_states[i].append([state.name, now_us()])
            while True:
                await ch.wait_for_state_change(state)
                state = ch.get_state()
                self.channel_states[i].append([state.name, now_us()])

        self.channel_watch = [asyncio.create_task(watch(i, ch)) for i, ch in enumerate(self.channels)]
        return {"followers": len(self.follows), "open": sum(1 for f in self.follows.values() if f.call is not None)}

    async def follow_wait_back(self, timeout: float) -> dict[str, Any]:
        reached = await self.follow_settled.wait_for(len(self.follows), timeout)
        return {"reached": reached, "settled": self.follow_settled.value}

    async def follow_collect(self) -> dict[str, Any]:
        for task in self.channel_watch:
            task.cancel()
        self.channel_watch = []
        fs = list(self.follows.values())
        back = [f for f in fs if f.back_us is not None]
        lost = collections.Counter(f.lost for f in fs if f.lost)
        return {
            "streams": len(fs),
            "back": len(back),
            "lost": dict(lost),
            "never_broke": sum(1 for f in fs if f.broke_us is None and not f.lost),
            "broke_not_back": sum(1 for f in fs if f.broke_us is not None and f.back_us is None and not f.lost),
            "back_us": [f.back_us for f in back],
            "reconnect_ms": [(f.back_us - f.broke_us) / 1000.0 for f in back if f.broke_us is not None],
            "failed_reopens": [f.failed_reopens for f in back],
            "broke_us_range": [min((f.broke_us for f in fs if f.broke_us), default=None),
                               max((f.broke_us for f in fs if f.broke_us), default=None)],  # fmt: skip
            **{k: dict(v) for k, v in self.follow_counts.items()},
            "samples": self.follow_samples,
            "reopen_failure_us": self.follow_failure_times,
            "gaps": sum(f.gaps for f in fs),
            "dups": sum(f.dups for f in fs),
            "channels": self.channel_states,
            "facade": FACADE_RESUME,
        }

    async def follow_mark_changes(self) -> dict[str, Any]:
        for f in self.follows.values():
            f.version_at_mark = f.last
            f.delivered = []
            f.recording = True
        self.follow_delivered.reset()
        return {}

    async def follow_check(self, changed: dict[str, int], timeout: float, settle: float = 0.5) -> dict[str, Any]:
        """After one change to each session of ``changed`` (session_id -> the version the write made):
        every follower of those must have received exactly that version and nothing else, every other
        follower nothing. ``settle`` s more after the expected count arrived, to catch extras."""
        following = [i for i in changed if i in self.follows and not self.follows[i].lost]
        reached = await self.follow_delivered.wait_for(len(following), timeout)
        await asyncio.sleep(settle)  # a grace period for duplicates or strays, not a synchronisation
        exact = missing = wrong = not_next = extra = 0
        examples: list[Any] = []
        for session_id, f in self.follows.items():
            if f.lost:
                continue  # given up (counted by follow_collect): it cannot receive anything
            if session_id in changed:
                want = changed[session_id]
                if want != f.version_at_mark + 1:
                    not_next += 1  # the write did not produce the next version (not the watcher's fault)
                if f.delivered == [want]:
                    exact += 1
                elif not f.delivered:
                    missing += 1
                else:
                    wrong += 1
                    if len(examples) < 5:
                        examples.append([session_id, f.version_at_mark, want, f.delivered])
            elif f.delivered:
                extra += 1
            f.recording = False
        return {"reached": reached, "changed": len(changed), "following": len(following), "exact": exact,
                "missing": missing, "wrong": wrong,
                "write_not_next_version": not_next, "unchanged_with_events": extra, "examples": examples,
                "gaps": sum(f.gaps for f in self.follows.values()), "dups": sum(f.dups for f in self.follows.values())}  # fmt: skip

    async def follow_close(self) -> dict[str, Any]:
        for task in self.channel_watch:
            task.cancel()
        self.channel_watch = []
        tasks = []
        for f in self.follows.values():
            if f.call is not None:
                f.call.cancel()
            if f.task is not None:
                f.task.cancel()
                tasks.append(f.task)
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        closed = len(self.follows)
        self.follows = {}
        self.follow_restarting = False
        self.follow_live.reset()
        self.follow_settled.reset()
        self.follow_delivered.reset()
        self._reset_follow_counts()
        return {"closed": closed}

    async def report_each(self, ids: list[str], inflight: int) -> dict[str, Any]:
        """One ReportStepResult per session; returns the version each write produced."""
        versions: dict[str, int] = {}

        async def one(session_id: str) -> None:
            stub = self.session_stubs[self._next()]
            response = await stub.ReportStepResult(
                spb.ReportStepResultRequest(environment=ENV, session_id=session_id, step_id=STEP, verdict="retry"),
                timeout=RPC_TIMEOUT,
            )
            versions[session_id] = response.session.version

        result = await closed_loop(one, ids, inflight=inflight, count=len(ids))
        result["versions"] = versions
        return result

    # expiry

    async def create_and_watch(
        self,
        n: int,
        inflight: int,
        flow_id: str | None = None,
        flows: list[list[Any]] | None = None,
        deadline_us: int | None = None,
        rate: float | None = None,
        ready_timeout: float = 120.0,
        watch: bool = True,
    ) -> dict[str, Any]:
        """Creates ``n`` sessions and (``watch``) opens a WatchSession on each right after its create answers.

        With ``flows`` ([timeout_s, flow_id] sorted by timeout) and ``deadline_us``, each create picks the
        flow whose timeout lands the session's expire_time nearest the shared deadline, from the
        server's create_time offset observed so far (an exponentially weighted average)."""
        group = Group(n)
        created: list[list[Any]] = []  # [session_id, create_us, expire_us]
        timeouts = [f[0] for f in flows] if flows else []
        offset_us = 2000.0  # send -> the server's create_time; learned as we go

        def pick() -> str:
            if flow_id is not None:
                return flow_id
            assert flows is not None and deadline_us is not None
            wanted = (deadline_us - (now_us() + offset_us)) / 1e6
            i = bisect.bisect_left(timeouts, wanted)
            if i == 0:
                return flows[0][1]
            if i >= len(timeouts):
                return flows[-1][1]
            return flows[i][1] if timeouts[i] - wanted < wanted - timeouts[i - 1] else flows[i - 1][1]

        async def one(_: Any) -> None:
            nonlocal offset_us
            sent = now_us()
            response = await self._create(pick())
            s = response.session
            create_us = ts_us(s.create_time)
            offset_us = 0.8 * offset_us + 0.2 * (create_us - sent)
            created.append([s.session_id, create_us, ts_us(s.expire_time)])
            if watch:
                await self._start_stream(s.session_id, group)

        if rate is None:
            result = await closed_loop(one, [], inflight=inflight, count=n)
        else:
            result = await paced(one, list(range(n)), rate=rate, duration=n / rate)
            result.pop("per_item", None)
        group.expected = len(created) if watch else 0
        if group.ready + group.failed >= group.expected:
            group.all_in.set()
        try:
            await asyncio.wait_for(group.all_in.wait(), ready_timeout)
        except TimeoutError:
            pass
        result.update(created=created, ready=group.ready, failed=group.failed, ready_us=now_us())
        return result

    async def wait_expired(self, count: int, timeout: float) -> dict[str, Any]:
        reached = await self.expired_count.wait_for(count, timeout)
        return {"reached": reached, "count": self.expired_count.value}

    async def expired_collect(self, clear: bool = True) -> list[list[Any]]:
        found = self.expired
        if clear:
            self.expired = []
            self.expired_count.reset()
        return found

    # polling

    async def _on_schedule(self, interval: float, poll: Callable[[], Awaitable[bool]], stats: dict[str, Any]) -> None:
        """Calls ``poll`` every ``interval`` s on a fixed schedule with a random phase until poll_stop, like
        a client polling on a timer; a poll that returns False ends the schedule."""
        loop = asyncio.get_running_loop()
        start = loop.time() + random.random() * interval
        k = 0
        while not self.poll_stop_event.is_set():
            delay = start + k * interval - loop.time()
            if delay > 0:
                try:  # the polling schedule; the stop event cuts it short
                    await asyncio.wait_for(self.poll_stop_event.wait(), delay)
                    return
                except TimeoutError:
                    pass
            k += 1
            if not await poll():
                return
            behind = loop.time() - (start + k * interval)
            if behind > 0:  # the poll took longer than the interval: skip the missed ticks
                skipped = int(behind // interval) + 1
                stats["late_ticks"] += skipped
                k += skipped

    async def _start_polling(self, count: int, poller: Callable[[int, Group], Awaitable[None]]) -> dict[str, Any]:
        self.poll_stop_event.clear()
        group = Group(count)
        self.pollers = [asyncio.create_task(poller(i, group)) for i in range(count)]
        await asyncio.wait_for(group.all_in.wait(), 60)
        return {"ready": group.ready, "failed": group.failed}

    async def poll_start(self, ids: list[str], interval: float) -> dict[str, Any]:
        """One poller per session, each calling GetSession every ``interval`` s; returns once every poller
        has its first answer (its baseline version)."""
        stats = {"polls": 0, "learned": 0, "skipped_versions": 0, "staleness_ms": [], "errors": Errors(), "late_ticks": 0}
        self.poll_stats = stats
        self.learned.reset()

        async def poller(i: int, group: Group) -> None:
            stub = self.session_stubs[self._next()]
            request = spb.GetSessionRequest(environment=ENV, session_id=ids[i])
            last = None

            async def poll() -> bool:
                nonlocal last
                try:
                    session = (await stub.GetSession(request, timeout=RPC_TIMEOUT)).session
                except Exception as exc:  # noqa: BLE001
                    stats["errors"].add(exc)
                    if last is None:
                        group.settle(False)
                        return False
                    return True
                receipt = now_us()
                stats["polls"] += 1
                if last is None:
                    last = session.version
                    group.settle(True)
                elif session.version > last:
                    gained = session.version - last
                    stats["learned"] += gained
                    stats["skipped_versions"] += gained - 1
                    stats["staleness_ms"].append((receipt - ts_us(session.update_time)) / 1000.0)
                    last = session.version
                    self.learned.add(gained)
                return True

            await self._on_schedule(interval, poll, stats)

        return await self._start_polling(len(ids), poller)

    async def wait_learned(self, count: int, timeout: float) -> dict[str, Any]:
        reached = await self.learned.wait_for(count, timeout)
        return {"reached": reached, "learned": self.learned.value}

    async def poll_stop(self) -> dict[str, Any]:
        self.poll_stop_event.set()
        if self.pollers:
            await asyncio.wait(self.pollers, timeout=RPC_TIMEOUT + 5)
        self.pollers = []
        stats = dict(self.poll_stats)
        if "errors" in stats:
            stats["errors"] = stats["errors"].as_dict()
        self.poll_stats = {}
        return stats

    # the bare grpc.aio server

    async def echo_closed(self, inflight: int, duration: float, size: int = 64) -> dict[str, Any]:
        payload = b"e" * size

        async def one(_: Any) -> None:
            await self.bare_calls[self._next()]["echo"](payload, timeout=RPC_TIMEOUT)

        return await closed_loop(one, [], inflight=inflight, duration=duration)

    async def bare_poll_start(self, count: int, interval: float, size: int) -> dict[str, Any]:
        """``count`` clients, each calling Echo with ``size`` bytes every ``interval`` s (the bare analogue
        of polling GetSession); returns once every poller has had its first answer."""
        stats = {"polls": 0, "errors": Errors(), "late_ticks": 0}
        self.poll_stats = stats
        payload = b"p" * size

        async def poller(i: int, group: Group) -> None:
            echo = self.bare_calls[self._next()]["echo"]
            first = True

            async def poll() -> bool:
                nonlocal first
                try:
                    await echo(payload, timeout=RPC_TIMEOUT)
                except Exception as exc:  # noqa: BLE001
                    stats["errors"].add(exc)
                    if first:
                        group.settle(False)
                        return False
                    return True
                stats["polls"] += 1
                if first:
                    first = False
                    group.settle(True)
                return True

            await self._on_schedule(interval, poll, stats)

        return await self._start_polling(count, poller)

    async def _start_bare_stream(self, key: str, group: Group) -> None:
        await self.open_slots.acquire()
        call = self.bare_calls[self._next()]["watch"](key.encode())
        self._stream_seq += 1
        seq = self._stream_seq
        task = asyncio.create_task(self._read_bare_stream(seq, call, group))
        self.streams[seq] = (call, task, key)

    async def _read_bare_stream(self, seq: int, call: Any, group: Group) -> None:
        first = True
        try:
            async for message in call:
                receipt = now_us()
                if first:
                    first = False
                    self.open_slots.release()
                    group.settle(True)
                    continue
                if self.recording:
                    self.latencies_ms.append((receipt - _STAMP.unpack_from(message)[0]) / 1000.0)
                self.received.add()
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            if not (exc.code() is grpc.StatusCode.CANCELLED and call.cancelled()):
                self.stream_errors.add(exc)
                self.last_stream_error = f"{exc.code().name}: {exc.details()}"
        except Exception as exc:  # noqa: BLE001
            self.stream_errors.add(exc)
            self.last_stream_error = repr(exc)
        finally:
            if first:
                self.open_slots.release()
                group.settle(False)
            self.streams.pop(seq, None)

    async def bare_watch_open(self, keys: list[str], timeout: float = 120.0) -> dict[str, Any]:
        return await self._open_all(keys, self._start_bare_stream, timeout)

    async def bare_publish_paced(self, keys: list[str], rate: float, duration: float) -> dict[str, Any]:
        async def one(key: str) -> None:
            await self.bare_calls[self._next()]["publish"](key.encode(), timeout=RPC_TIMEOUT)

        return await paced(one, keys, rate=rate, duration=duration)

    async def bare_publish_closed(self, keys: list[str], inflight: int, duration: float) -> dict[str, Any]:
        async def one(key: str) -> None:
            await self.bare_calls[self._next()]["publish"](key.encode(), timeout=RPC_TIMEOUT)

        return await closed_loop(one, keys, inflight=inflight, duration=duration)

    async def bare_publish_all(self) -> int:
        """One message to every open bare stream, all stamped at the same moment; returns how many."""
        answer = await self.bare_calls[self._next()]["publish_all"](b"", timeout=RPC_TIMEOUT)
        return int(_STAMP.unpack_from(answer)[0])

    async def ping(self) -> str:
        return "pong"


async def _serve() -> None:
    raise_nofile()
    worker = Worker()
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def read_stdin() -> None:  # a thread: blocking reads never stall the loop
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=read_stdin, name="stdin", daemon=True).start()
    out = sys.stdout
    tasks: set[asyncio.Task[None]] = set()

    def reply(message: dict[str, Any]) -> None:
        out.write(json.dumps(message, separators=(",", ":")) + "\n")
        out.flush()

    async def run(request: dict[str, Any]) -> None:
        try:
            method = getattr(worker, request["cmd"])
            result = await method(**request.get("args", {}))
            reply({"id": request["id"], "ok": True, "result": result})
        except Exception as exc:  # noqa: BLE001 - reported to the orchestrator
            reply({"id": request["id"], "ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})

    while True:
        line = await lines.get()
        if line is None:  # the orchestrator closed our stdin (or died): stop
            break
        request = json.loads(line)
        if request.get("cmd") == "exit":
            reply({"id": request["id"], "ok": True, "result": None})
            break
        task = asyncio.create_task(run(request))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for task in tasks:
        task.cancel()
    try:
        await asyncio.wait_for(worker.close_all(), 10)
    except Exception:  # noqa: BLE001 - exiting anyway
        pass


def main() -> None:
    asyncio.run(_serve())


if __name__ == "__main__":
    main()
