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
        # queue of calls not yet picked up by the application (grpc core cancels the excess with
        # CANCELLED), so each worker keeps at most this many opens pending and awaits the rest.
        self.open_slots = asyncio.Semaphore(OPEN_PENDING)

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
                "watch": ch.unary_stream("/bench.Bare/Watch", request_serializer=_identity, response_deserializer=_identity),
            }
            for ch in self.channels
        ]
        return {"channels": len(self.channels)}

    async def close_all(self) -> dict[str, Any]:
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
        loop = asyncio.get_running_loop()
        start = loop.time()
        group = Group(len(ids))
        for session_id in ids:
            await self._start_stream(session_id, group)
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

    async def poll_start(self, ids: list[str], interval: float) -> dict[str, Any]:
        """One poller per session, each calling GetSession every ``interval`` s on a fixed schedule with a
        random phase; returns once every poller has its first answer (its baseline version)."""
        self.poll_stop_event.clear()
        stats = {"polls": 0, "learned": 0, "skipped_versions": 0, "staleness_ms": [], "errors": Errors(), "late_ticks": 0}
        self.poll_stats = stats
        self.learned.reset()
        group = Group(len(ids))
        loop = asyncio.get_running_loop()

        async def poller(session_id: str) -> None:
            stub = self.session_stubs[self._next()]
            request = spb.GetSessionRequest(environment=ENV, session_id=session_id)
            last = None
            start = loop.time() + random.random() * interval
            k = 0
            while not self.poll_stop_event.is_set():
                target = start + k * interval
                delay = target - loop.time()
                if delay > 0:
                    try:  # the polling schedule; the stop event cuts it short
                        await asyncio.wait_for(self.poll_stop_event.wait(), delay)
                        return
                    except TimeoutError:
                        pass
                k += 1
                try:
                    session = (await stub.GetSession(request, timeout=RPC_TIMEOUT)).session
                except Exception as exc:  # noqa: BLE001
                    stats["errors"].add(exc)
                    if last is None:
                        group.settle(False)
                        return
                    continue
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
                behind = loop.time() - (start + k * interval)
                if behind > 0:  # the poll took longer than the interval: skip the missed ticks
                    skipped = int(behind // interval) + 1
                    stats["late_ticks"] += skipped
                    k += skipped

        self.pollers = [asyncio.create_task(poller(s)) for s in ids]
        await asyncio.wait_for(group.all_in.wait(), 60)
        return {"ready": group.ready, "failed": group.failed}

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
        loop = asyncio.get_running_loop()
        start = loop.time()
        group = Group(len(keys))
        for key in keys:
            await self._start_bare_stream(key, group)
        try:
            await asyncio.wait_for(group.all_in.wait(), timeout)
        except TimeoutError:
            pass
        return {"ready": group.ready, "failed": group.failed, "elapsed": loop.time() - start, "open": len(self.streams)}

    async def bare_publish_paced(self, keys: list[str], rate: float, duration: float) -> dict[str, Any]:
        async def one(key: str) -> None:
            await self.bare_calls[self._next()]["publish"](key.encode(), timeout=RPC_TIMEOUT)

        return await paced(one, keys, rate=rate, duration=duration)

    async def bare_publish_closed(self, keys: list[str], inflight: int, duration: float) -> dict[str, Any]:
        async def one(key: str) -> None:
            await self.bare_calls[self._next()]["publish"](key.encode(), timeout=RPC_TIMEOUT)

        return await closed_loop(one, keys, inflight=inflight, duration=duration)

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
