"""The orchestrator: starts servers and client workers, runs every phase, returns the raw results.

Phases (each with its own server process and a fresh temporary database):
  bare      the bare grpc.aio server: echo rate at 64 in flight, memory and idle CPU of 10,000 streams,
            stream delivery latency at 10,000 and 1,000 streams.
  main      flowsession: sessions created/s and status changes/s at 64 in flight (0 watchers), memory per
            idle WatchSession and idle CPU of 10,000 streams, watch delivery latency at 10,000 and
            1,000 streams with 1,000 changes/s, then created/s and changes/s with 1,000 watchers.
  expiry    a storm of 10,000 sessions sharing one expire_time, then expiry lag of sessions spread in time.
  polling   1,000 clients learning each change by GetSession every 1 s against WatchSession.
  restart   a reconnect storm: 10,000 watchers on a server on a fixed port; SIGTERM it, start a new one on
            the same port and database; every watcher resumes the way the client facade does; then one
            change to each of 1,000 sessions checks that each watcher gets exactly the next version.
"""
from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import psutil
from flowsession_server.config import Settings

from . import gc_probe, profile, report, stats
from .procs import Processes, ServerProc, WorkerProc, free_port, start_bare, start_flowsession

WATCH_CHANNELS = 4  # per watcher worker: 10,000 streams -> 1,250 per HTTP/2 connection
DRIVER_CHANNELS = 2
LONG = 300.0  # upper bound of any single worker command
LATE_US = 50_000  # an expiry later than the 50 ms target
STORM_INFLIGHT = 8  # creates in flight while the storm's sessions are made (all drivers together)
HEARTBEAT_S = Settings.watch_heartbeat  # the servers' default: an idle WatchSession's heartbeat interval


@dataclass(frozen=True)
class Scale:
    quick: bool
    small: int  # watchers, "1,000"
    large: int  # watchers, "10,000"
    change_rate: float  # status changes/s during the latency runs
    latency_window: float  # seconds of paced changes per latency run
    idle_window: float  # seconds 10,000 streams sit idle; >= HEARTBEAT_S so every stream's heartbeat falls in it
    throughput_window: float  # seconds per throughput run
    inflight: int  # calls in flight in the throughput runs
    storm: int  # sessions sharing one expire_time
    lag_sessions: int
    lag_spread: float  # seconds over which the lag sessions are created
    lag_timeout: float  # their execution_timeout
    pollers: int
    poll_interval: float
    poll_window: float
    change_every: float  # mean seconds between two changes of one session in the polling phase
    profile_seconds: float
    warmup: float  # seconds of load before the first throughput measurement on a server
    bare_payload: int  # padding bytes of each bare stream message (~ a SessionEvent's size)
    restart_back_timeout: float = 60.0  # restart phase: how long the watchers get to come back
    stream_pairs: int = 4  # polling phase: paired windows (changes with streams open / with none), alternating order


    @classmethod
    def full(cls) -> Scale:
        return cls(
            quick=False, small=1000, large=10_000, change_rate=1000.0, latency_window=10.0, idle_window=HEARTBEAT_S,
            throughput_window=10.0, inflight=64, storm=10_000, lag_sessions=1000, lag_spread=10.0, lag_timeout=2.0,
            pollers=1000, poll_interval=1.0, poll_window=30.0, change_every=30.0, profile_seconds=5.0, warmup=2.0, bare_payload=400,
        )  # fmt: skip

    @classmethod
    def quick_run(cls) -> Scale:
        """Counts and rates down 10x, windows shortened: a ~1 minute smoke run."""
        return cls(
            quick=True, small=100, large=1000, change_rate=100.0, latency_window=3.0, idle_window=3.0,
            throughput_window=3.0, inflight=64, storm=1000, lag_sessions=100, lag_spread=3.0, lag_timeout=1.0,
            pollers=100, poll_interval=1.0, poll_window=6.0, change_every=30.0, profile_seconds=2.0, warmup=0.5, bare_payload=400,
            restart_back_timeout=15.0, stream_pairs=2,
        )  # fmt: skip


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def rss_bytes(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


async def settle(pid: int, *, busy_pct: float = 20.0, span: float = 0.5, timeout: float = 30.0) -> float:
    """Waits (up to ``timeout``) until the server used under ``busy_pct`` of a core over ``span`` seconds,
    so a measurement never starts while the server still works off the previous step (thousands of
    streams just closed, or calls queued behind a profiler). Returns the seconds it waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        cpu0 = cpu_seconds(pid)
        await asyncio.sleep(span)  # the measurement interval
        if 100.0 * (cpu_seconds(pid) - cpu0) / span < busy_pct:
            break
    return time.monotonic() - t0


class Window:
    """Server CPU-seconds and whole-machine busy share between start() and stop()."""

    def __init__(self, pid: int):
        self.pid = pid

    def start(self) -> Window:
        self._wall0 = time.time()
        self._t0 = time.monotonic()
        self._cpu0 = cpu_seconds(self.pid)
        self._machine0 = psutil.cpu_times()
        return self

    def stop(self) -> dict[str, float]:
        elapsed = time.monotonic() - self._t0
        cpu = cpu_seconds(self.pid) - self._cpu0
        m1 = psutil.cpu_times()
        busy = (m1.user + m1.system + m1.nice + getattr(m1, "softirq", 0) + getattr(m1, "irq", 0)) - (
            self._machine0.user + self._machine0.system + self._machine0.nice
            + getattr(self._machine0, "softirq", 0) + getattr(self._machine0, "irq", 0)
        )  # fmt: skip
        cores = psutil.cpu_count() or 1
        return {
            "wall": [round(self._wall0, 3), round(time.time(), 3)],
            "seconds": elapsed,
            "server_cpu_s": cpu,
            "server_cpu_pct_of_core": 100.0 * cpu / elapsed if elapsed else 0.0,
            "machine_busy_pct": 100.0 * busy / (elapsed * cores) if elapsed else 0.0,
        }


_STALL = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) WARNING \S+: a commit took (\d+) ms")


def disk_stalls(log_path: Path) -> list[list[float]]:
    """[end (epoch s), length (ms)] of the commits the server logged as disk stalls: each held its event
    loop for that long (the first commit of a stall runs on the loop; README, Group commit)."""
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        match = _STALL.match(line)
        if match:
            stamp, millis, took = match.groups()
            end = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000  # the server's local time
            out.append([end, float(took)])
    return out


def _mean_windows(windows: list[dict[str, float]]) -> dict[str, float]:
    """The mean of several windows' figures (their wall-clock spans stay with each window)."""
    return {k: sum(w[k] for w in windows) / len(windows) for k in windows[0] if k != "wall"}


def _sum_counts(counts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def _fmt_s(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def covers_heartbeat(window_s: float, open_seconds: float, heartbeat_s: float) -> bool:
    """Whether an idle window started as the last stream opened holds every stream's first heartbeat
    (each due ``heartbeat_s`` after that stream's own open)."""
    return window_s >= heartbeat_s and open_seconds <= heartbeat_s


def split(items: list[Any], parts: int) -> list[list[Any]]:
    return [items[i::parts] for i in range(parts)]


def expected_for(per_item: dict[str, int], ids: list[str]) -> int:
    return sum(per_item.get(i, 0) for i in ids)


async def alternating_pairs(
    count: int, with_streams: Callable[[], Awaitable[dict[str, Any]]], without_streams: Callable[[], Awaitable[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """``count`` pairs of windows, alternating which one runs first, so a drift over the phase cancels."""
    pairs = []
    for i in range(count):
        first, second = (with_streams, without_streams) if i % 2 == 0 else (without_streams, with_streams)
        pairs.append({**await first(), **await second(), "streams_first": i % 2 == 0})
    return pairs


class Bench:
    def __init__(self, scale: Scale, workdir: Path, log: Callable[[str], None], do_profile: bool):
        self.scale = scale
        self.workdir = workdir
        self.log = log
        self.do_profile = do_profile and profile.py_spy() is not None
        self.procs = Processes(workdir)
        self.watchers: list[WorkerProc] = []
        self.drivers: list[WorkerProc] = []
        self.phase_seconds: dict[str, float] = {}
        self.profiles: dict[str, Any] = {}

    @property
    def workers(self) -> list[WorkerProc]:
        return [*self.watchers, *self.drivers]

    async def start_workers(self) -> None:
        self.watchers = list(await asyncio.gather(*(WorkerProc.start(self.procs, f"watcher{i}") for i in range(2))))
        self.drivers = list(await asyncio.gather(*(WorkerProc.start(self.procs, f"driver{i}") for i in range(2))))

    async def connect(self, server: ServerProc) -> None:
        await asyncio.gather(
            *(w.call("connect", target=server.address, channels=WATCH_CHANNELS) for w in self.watchers),
            *(d.call("connect", target=server.address, channels=DRIVER_CHANNELS) for d in self.drivers),
        )

    async def disconnect(self) -> None:
        await asyncio.gather(*(w.call("close_all", call_timeout=60) for w in self.workers), return_exceptions=True)

    async def all_watchers(self, cmd: str, **args: Any) -> list[Any]:
        return list(await asyncio.gather(*(w.call(cmd, call_timeout=LONG, **args) for w in self.watchers)))

    async def maybe_profile(
        self, key: str, pid: int, workload: Callable[[], Awaitable[Any]], seconds: float | None = None
    ) -> None:
        """py-spy on the server while ``workload`` (a re-run of what was just measured) runs."""
        if not self.do_profile:
            return
        seconds = seconds or self.scale.profile_seconds
        self.log(f"  profiling {key} with py-spy ({seconds:.0f} s re-run)")
        out = self.workdir / f"profile-{key}.txt"
        try:
            self.profiles[key] = await profile.record_during(pid, seconds, out, workload)
        except Exception as exc:  # noqa: BLE001 - a failed profile must not lose the measurements
            self.profiles[key] = {"error": repr(exc)}

    async def timed(self, name: str, phase: Callable[[], Awaitable[dict[str, Any]]], budget: float) -> dict[str, Any]:
        """Runs one phase, bounded by ``budget`` seconds (a quarter of that in a quick run)."""
        if self.scale.quick:
            budget /= 4
        self.log(f"phase {name} ...")
        t0 = time.monotonic()
        try:
            return await asyncio.wait_for(phase(), budget)
        except TimeoutError:
            raise RuntimeError(f"phase {name} took longer than its {budget:.0f} s budget") from None
        finally:
            self.phase_seconds[name] = round(time.monotonic() - t0, 1)
            self.log(f"phase {name} done in {self.phase_seconds[name]} s")

    # shared measurement steps

    async def open_streams(self, cmd: str, keys: list[str]) -> tuple[dict[str, Any], list[list[str]]]:
        parts = split(keys, len(self.watchers))
        t0 = time.monotonic()
        results = await asyncio.gather(
            *(w.call(cmd, keys=p, call_timeout=LONG) if cmd == "bare_watch_open" else w.call(cmd, ids=p, call_timeout=LONG)
              for w, p in zip(self.watchers, parts))
        )  # fmt: skip
        elapsed = time.monotonic() - t0
        ready = sum(r["ready"] for r in results)
        failed = sum(r["failed"] for r in results)
        if ready != len(keys):
            raise RuntimeError(f"only {ready} of {len(keys)} streams opened ({failed} failed)")
        return {"streams": ready, "open_seconds": elapsed, "opens_per_s": ready / elapsed if elapsed else 0.0}, parts

    async def latency_run(
        self, pid: int, parts: list[list[str]], publish: str, rate: float, window: float
    ) -> dict[str, Any]:
        """Paced changes (or bare publishes) at ``rate`` over the streams' keys; every delivery's latency."""
        keys = [k for p in parts for k in p]
        random.shuffle(keys)
        settled = await settle(pid)
        await self.all_watchers("watch_mark", recording=True)
        win = Window(pid).start()
        if publish == "changes":
            sent = await self.drivers[0].call("changes_paced", ids=keys, rate=rate, duration=window, call_timeout=LONG)
        else:
            sent = await self.drivers[0].call("bare_publish_paced", keys=keys, rate=rate, duration=window, call_timeout=LONG)
        cpu = win.stop()
        per_item = sent.pop("per_item")
        waits = await asyncio.gather(
            *(w.call("wait_received", count=expected_for(per_item, p), timeout=30.0, call_timeout=60)
              for w, p in zip(self.watchers, parts))
        )  # fmt: skip
        collected = await self.all_watchers("watch_collect")
        await self.all_watchers("watch_mark", recording=False)
        latencies = [x for c in collected for x in c["latencies_ms"]]
        return {
            "latency_ms": stats.summary(latencies),
            "sent": sent,
            "delivered": sum(c["received"] for c in collected),
            "expected": sum(per_item.values()),
            "all_delivered": all(w["reached"] for w in waits),
            "stream_errors": [c["stream_errors"] for c in collected],
            "window": cpu,
            "streams": sum(len(p) for p in parts),
            "rate": rate,
            "settled_s": round(settled, 2),
        }

    async def latency_runs(self, pid: int, parts: list[list[str]], key: str, *, p99_target_ms: float) -> dict[str, Any]:
        """Delivery latency over the streams in ``parts`` at the full change rate, then (supplementary) at
        half of it, to tell queueing from the per-event path; profiled when the full rate misses."""
        s = self.scale
        out: dict[str, Any] = {}
        streams = sum(len(p) for p in parts)
        for suffix, rate in (("", s.change_rate), ("_half_rate", s.change_rate / 2)):
            out[key + suffix] = await self.latency_run(pid, parts, "changes", rate, s.latency_window)
            self.log(f"  latency at {streams}{', half rate' if suffix else ''}: {out[key + suffix]['latency_ms']}")
        if out[key]["latency_ms"]["p99"] > p99_target_ms:
            ids = [i for p in parts for i in p]
            await self.maybe_profile(
                f"watch_{key}", pid,
                lambda: self.drivers[0].call("changes_paced", ids=ids, rate=s.change_rate, duration=s.profile_seconds, call_timeout=LONG),
            )  # fmt: skip
        return out

    async def idle(self, pid: int, opened: dict[str, Any], heartbeat_s: float | None = None) -> dict[str, Any]:
        """Server CPU while the streams sit idle, from the moment the last one opened. An idle WatchSession
        gets a heartbeat ``heartbeat_s`` after its last message, so a window that short of it right after
        the opens holds none of them: it holds one heartbeat of every stream only when it lasts at least
        ``heartbeat_s`` and the opens took no longer than that."""
        win = Window(pid).start()
        await asyncio.sleep(self.scale.idle_window)  # the measurement itself: streams sitting idle
        out = win.stop()
        if heartbeat_s is not None:
            out["heartbeat_s"] = heartbeat_s
            out["covers_heartbeat"] = covers_heartbeat(self.scale.idle_window, opened["open_seconds"], heartbeat_s)
        return out

    async def closed(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Both drivers at inflight/2 each; the combined rate over the longest driver's elapsed time."""
        half = self.scale.inflight // len(self.drivers)
        results = await asyncio.gather(*(d.call(cmd, inflight=half, call_timeout=LONG, **a) for d, a in self._per_driver(args)))
        elapsed = max(r["elapsed"] for r in results)
        done = sum(r["done"] for r in results)
        errors: dict[str, int] = {}
        for r in results:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        out = {"done": done, "elapsed": elapsed, "rate": done / elapsed if elapsed else 0.0, "errors": errors, "inflight": half * len(self.drivers)}
        ids = [i for r in results for i in r.get("ids", [])]
        if ids:
            out["ids"] = ids
        return out

    async def closed_at(self, inflight: int, cmd: str, n: int, **args: Any) -> dict[str, Any]:
        """``cmd`` on both drivers with ``inflight`` calls in flight in all and ``n`` calls in all."""
        per = inflight // len(self.drivers)
        results = await asyncio.gather(
            *(d.call(cmd, inflight=per, n=n // len(self.drivers), call_timeout=LONG, **args) for d in self.drivers)
        )
        elapsed = max(r["elapsed"] for r in results)
        done = sum(r["done"] for r in results)
        errors: dict[str, int] = {}
        for r in results:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        return {"done": done, "elapsed": elapsed, "rate": done / elapsed if elapsed else 0.0, "errors": errors,
                "created": [c for r in results for c in r.get("created", [])]}  # fmt: skip

    def _per_driver(self, args: dict[str, Any]) -> list[tuple[WorkerProc, dict[str, Any]]]:
        out = []
        for i, d in enumerate(self.drivers):
            a = dict(args)
            if "ids" in a:  # each driver takes its own share of the sessions
                a["ids"] = a["ids"][i :: len(self.drivers)]
            if a.get("count") is not None:
                a["count"] = a["count"] // len(self.drivers)
            out.append((d, a))
        return out

    async def finish(self, server: ServerProc, out: dict[str, Any]) -> None:
        """Ends a phase: closes the workers' channels, stops the server, and adds the server's garbage
        collections to every measurement window of the phase (the probe writes them as it exits)."""
        await self.disconnect()
        await server.stop()
        stalls = disk_stalls(server.log_path)
        if stalls:
            out["disk_stalls"] = stalls
        if server.gc_path is None:
            return
        data = gc_probe.load(str(server.gc_path))
        out["gc_total"] = gc_probe.window(data, 0.0, float("inf"))

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                wall = node.get("wall")
                if isinstance(wall, list) and len(wall) == 2:
                    node["gc"] = gc_probe.window(data, wall[0], wall[1])
                    # A stall overlapping the window: it ended (was logged) after the window began
                    # and began before the window ended.
                    node["disk_stalls_ms"] = [ms for end, ms in stalls if end >= wall[0] and end - ms / 1000 <= wall[1]]
                late = node.get("late")
                if isinstance(late, list):  # [expire_us, event_us] of late expiries
                    node["late_during_gc_pause"] = sum(
                        1 for e in late if gc_probe.overlapping(data, e[0] / 1e6, e[1] / 1e6)
                    )
                for value in list(node.values()):
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(out)

    # phases

    async def bare_phase(self) -> dict[str, Any]:
        s = self.scale
        server = await start_bare(self.procs, s.bare_payload, self.workdir / "bare.gc.jsonl")
        out: dict[str, Any] = {"payload_bytes": s.bare_payload + 8}
        try:
            await self.connect(server)
            await self.closed("echo_closed", duration=s.warmup)  # warm-up
            win = Window(server.pid).start()
            out["echo"] = await self.closed("echo_closed", duration=s.throughput_window)
            out["echo"]["window"] = win.stop()
            keys = [f"key{i}" for i in range(s.large)]
            rss0 = rss_bytes(server.pid)
            opened, parts = await self.open_streams("bare_watch_open", keys)
            rss1 = rss_bytes(server.pid)
            out["memory"] = {**opened, "rss_before": rss0, "rss_after": rss1, "per_stream_bytes": (rss1 - rss0) / s.large}
            out["idle"] = await self.idle(server.pid, opened)  # the bare streams send no heartbeats
            out["latency_large"] = await self.latency_run(server.pid, parts, "bare", s.change_rate, s.latency_window)
            out["storm"] = await self.bare_storm(server.pid, parts)
            self.log(f"  bare storm: {s.large:,} messages delivered in {_fmt_s(out['storm']['delivered_s'])} s")
            keep = s.small // len(self.watchers)
            small_parts = [p[:keep] for p in parts]
            await asyncio.gather(*(w.call("watch_close", keep=k, call_timeout=LONG) for w, k in zip(self.watchers, small_parts)))
            out["latency_small"] = await self.latency_run(server.pid, small_parts, "bare", s.change_rate, s.latency_window)
            out["polling"] = await self.bare_polling(server.pid, small_parts)
            return out
        finally:
            await self.finish(server, out)

    async def bare_storm(self, pid: int, parts: list[list[str]]) -> dict[str, Any]:
        """The stack's ceiling for the expiry storm: one message to every open stream at the same moment
        (PublishAll stamps it once); from that stamp until the last stream has it."""
        await settle(pid)
        await self.all_watchers("watch_mark", recording=True)
        win = Window(pid).start()
        pushed = await self.drivers[0].call("bare_publish_all", call_timeout=LONG)
        waits = await asyncio.gather(
            *(w.call("wait_received", count=len(p), timeout=60.0, call_timeout=90) for w, p in zip(self.watchers, parts))
        )
        cpu = win.stop()
        latencies = [x for c in await self.all_watchers("watch_collect") for x in c["latencies_ms"]]
        await self.all_watchers("watch_mark", recording=False)
        return {
            "pushed": pushed,
            "delivered": len(latencies),
            "all_delivered": all(w["reached"] for w in waits),
            "delivered_s": max(latencies) / 1000.0 if latencies else None,
            "latency_ms": stats.summary(latencies),
            "window": cpu,
        }

    async def bare_polling(self, pid: int, parts: list[list[str]]) -> dict[str, Any]:
        """The stack's ceiling for polling against streaming, with the polling phase's clients and rates:
        polls are Echo calls (as large as a bare stream message) every poll_interval, changes are
        Publish calls; a poll's cost is the polling window's CPU per poll, a delivery's the paired
        difference of the same publishes with and without the streams open."""
        s = self.scale
        keys = [k for p in parts for k in p]
        rate = len(keys) / s.change_every
        await self.all_watchers("watch_close")  # every pair's streams are opened just before its window

        async def publishes() -> dict[str, Any]:
            await settle(pid)
            order = list(keys)
            random.shuffle(order)
            win = Window(pid).start()
            sent = await self.drivers[0].call("bare_publish_paced", keys=order, rate=rate, duration=s.poll_window, call_timeout=LONG)
            return {"sent": sent.pop("done"), "window": win.stop()}

        await settle(pid)
        await asyncio.gather(
            *(w.call("bare_poll_start", count=len(p), interval=s.poll_interval, size=s.bare_payload, call_timeout=LONG)
              for w, p in zip(self.watchers, parts))
        )  # fmt: skip
        win = Window(pid).start()
        await asyncio.sleep(s.poll_window)  # the measurement itself: the pollers' own load
        polling_window = win.stop()
        polled = await self.all_watchers("poll_stop")
        polling = {
            "clients": len(keys), "window": polling_window, "polls": sum(p["polls"] for p in polled),
            "late_ticks": sum(p["late_ticks"] for p in polled), "errors": [p["errors"] for p in polled],
        }  # fmt: skip

        async def with_streams() -> dict[str, Any]:
            await self.open_streams("bare_watch_open", keys)
            run = await publishes()
            await self.all_watchers("watch_close")
            return run

        async def without_streams() -> dict[str, Any]:
            run = await publishes()
            return {"baseline_sent": run["sent"], "baseline_window": run["window"]}

        # Half the polling phase's pairs: the bare figure is the reference, not the target, and the phase is long.
        pairs = await alternating_pairs(max(1, s.stream_pairs // 2), with_streams, without_streams)
        return {"change_rate": rate, "polling": polling, "streaming": {"streams": len(keys), "pairs": pairs}}

    async def main_phase(self, echo_rate: float) -> dict[str, Any]:
        s = self.scale
        server = await start_flowsession(self.procs, self.workdir / "main.db")
        pid = server.pid
        out: dict[str, Any] = {}
        try:
            await self.connect(server)
            (flow_id,) = await self.drivers[0].call("create_flows", timeouts_s=[None])
            await self.closed("create_sessions", flow_id=flow_id, duration=s.warmup, return_ids=False)  # warm-up
            # 3. durable throughput, 0 watchers
            win = Window(pid).start()
            created = await self.closed("create_sessions", flow_id=flow_id, count=s.large)
            created["window"] = win.stop()
            ids = created.pop("ids")
            if len(ids) < s.large:
                raise RuntimeError(f"only {len(ids)} of {s.large} sessions created: {created['errors']}")
            out["create_0"] = created
            win = Window(pid).start()
            out["change_0"] = await self.closed("changes_closed", ids=ids, duration=s.throughput_window)
            out["change_0"]["window"] = win.stop()
            self.log(f"  created/s {created['rate']:.0f}, changes/s {out['change_0']['rate']:.0f} (0 watchers)")
            # 2. memory per idle stream and CPU while idle
            rss0 = rss_bytes(pid)
            opened, parts = await self.open_streams("watch_open", ids)
            rss1 = rss_bytes(pid)
            out["memory"] = {**opened, "rss_before": rss0, "rss_after": rss1, "per_stream_bytes": (rss1 - rss0) / s.large}
            out["idle"] = await self.idle(pid, opened, HEARTBEAT_S)
            self.log(f"  {(rss1 - rss0) / s.large / 1024:.1f} KB per idle stream; idle CPU {out['idle']['server_cpu_s']:.2f} s")
            # 1. delivery latency, 10,000 streams then 1,000
            out.update(await self.latency_runs(pid, parts, "latency_large", p99_target_ms=10.0))
            keep = s.small // len(self.watchers)
            small_parts = [p[:keep] for p in parts]
            await asyncio.gather(*(w.call("watch_close", keep=k, call_timeout=LONG) for w, k in zip(self.watchers, small_parts)))
            small_ids = [i for p in small_parts for i in p]
            out.update(await self.latency_runs(pid, small_parts, "latency_small", p99_target_ms=5.0))
            # 3. durable throughput with 1,000 watchers (the changes land on the watched sessions)
            win = Window(pid).start()
            out["change_w"] = await self.closed("changes_closed", ids=small_ids, duration=s.throughput_window)
            out["change_w"]["window"] = win.stop()
            win = Window(pid).start()
            out["create_w"] = await self.closed("create_sessions", flow_id=flow_id, duration=s.throughput_window, return_ids=False)
            out["create_w"]["window"] = win.stop()
            self.log(f"  with {s.small} watchers: created/s {out['create_w']['rate']:.0f}, changes/s {out['change_w']['rate']:.0f}")
            if min(out["change_0"]["rate"], out["change_w"]["rate"]) < 0.75 * echo_rate:
                await self.maybe_profile(
                    "status_changes", pid, lambda: self.closed("changes_closed", ids=ids, duration=s.profile_seconds)
                )
            return out
        finally:
            await self.finish(server, out)

    async def expiry_phase(self, open_rate: float) -> dict[str, Any]:
        server = await start_flowsession(self.procs, self.workdir / "expiry.db")
        out: dict[str, Any] = {}
        try:
            await self.connect(server)
            out["storm_setup"], out["storm"] = await self.storm(server.pid, open_rate)
            self.log(f"  storm delivered in {out['storm']['delivered_s_from_first_deadline']:.2f} s")
            out["lag"] = await self.lag(server.pid)
            self.log(f"  expiry lag {out['lag']['expiry_lag_ms']}")
            if out["lag"]["expiry_lag_ms"]["p99"] > 50.0:
                await self.maybe_profile(
                    "expiry_lag", server.pid, lambda: self.lag(server.pid), self.scale.lag_spread + self.scale.lag_timeout
                )
            if out["storm"]["delivered_s_from_first_deadline"] > 3.0 and self.do_profile:
                await self.storm(server.pid, open_rate, profile_seconds=out["storm"]["delivered_s_from_first_deadline"] + 1.0)
            return out
        finally:
            await self.finish(server, out)

    async def storm(
        self, pid: int, open_rate: float, profile_seconds: float | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``scale.storm`` sessions sharing one expire_time, each watched; from the deadline until every
        EXPIRED event has reached its watcher. With ``profile_seconds``: a re-run, py-spy from the deadline."""
        s = self.scale
        # expire_time = create_time + the version's execution_timeout, and creating 10,000 sessions takes
        # seconds. So: one flow per 25 ms of timeout, and each create picks the flow that lands its
        # expire_time nearest the shared deadline D, from the send -> create_time offset it has seen so
        # far. Few calls in flight keep that offset steady (a deep queue would scatter it). The watches
        # are opened after every create, all before D.
        (cal_flow,) = await self.drivers[0].call("create_flows", timeouts_s=[None])
        calibrate = await self.closed_at(
            STORM_INFLIGHT, "create_and_watch", n=min(500, s.storm // 10), flow_id=cal_flow, watch=False
        )
        create_est = s.storm / max(calibrate["rate"], 1.0)
        open_est = s.storm / max(open_rate, 1.0)
        lead = 1.3 * (create_est + open_est) + 3.0
        step = 0.025
        lowest = max(1.0, lead - 1.6 * create_est - 0.5)
        timeouts = [round(lowest + i * step, 3) for i in range(int((lead + 0.5 - lowest) / step) + 1)]
        t0 = time.monotonic()
        flow_ids = await self.drivers[0].call("create_flows", timeouts_s=timeouts, inflight=32, call_timeout=LONG)
        flows = [[t, f] for t, f in zip(timeouts, flow_ids)]
        setup = {
            "flows": len(flows), "timeout_step_s": step, "flows_seconds": time.monotonic() - t0,
            "calibration_creates_per_s": calibrate["rate"], "create_inflight": STORM_INFLIGHT, "lead_s": lead,
        }  # fmt: skip
        deadline_us = time.time_ns() // 1000 + int(lead * 1e6)
        what = "storm (profiled re-run)" if profile_seconds else "storm"
        self.log(f"  {what}: {s.storm} sessions, shared deadline in {lead:.1f} s ({len(flows)} flows)")
        made = await self.closed_at(
            STORM_INFLIGHT, "create_and_watch", n=s.storm, flows=flows, deadline_us=deadline_us, watch=False
        )
        created = made["created"]
        ids = [c[0] for c in created]
        opened, parts = await self.open_streams("watch_open", ids)
        ready_us = time.time_ns() // 1000
        expires = sorted(c[2] for c in created)
        first_deadline, last_deadline = expires[0], expires[-1]

        async def wait_all() -> list[dict[str, Any]]:
            return list(await asyncio.gather(
                *(w.call("wait_expired", count=len(p), timeout=lead + 60, call_timeout=lead + 90)
                  for w, p in zip(self.watchers, parts))
            ))  # fmt: skip

        if profile_seconds:
            # py-spy from just before the first deadline (a wall-clock moment, not an event) to the end
            await asyncio.sleep(max(0.0, (first_deadline - time.time_ns() // 1000) / 1e6 - 0.2))
            await self.maybe_profile("expiry_storm", pid, wait_all, profile_seconds + 0.2)
            await self.all_watchers("expired_collect")
            await self.all_watchers("watch_close")
            return setup, {}
        win = Window(pid).start()
        waits = await wait_all()
        storm_cpu = win.stop()
        expired = [e for r in await self.all_watchers("expired_collect") for e in r]
        await self.all_watchers("watch_close")
        receipts = [e[3] for e in expired]
        return setup, {
            "sessions": len(created),
            "create_errors": made["errors"],
            "watchers_ready": opened["streams"],
            "watch_open_seconds": opened["open_seconds"],
            "all_open_before_first_deadline": ready_us < first_deadline,
            "open_margin_s": (first_deadline - ready_us) / 1e6,
            "deadline_spread_ms": {
                "min_vs_target": (first_deadline - deadline_us) / 1000,
                "max_vs_target": (last_deadline - deadline_us) / 1000,
                "p1_to_p99": (stats.percentile(expires, 99) - stats.percentile(expires, 1)) / 1000,
                "full": (last_deadline - first_deadline) / 1000,
            },
            "expired_delivered": len(expired),
            "all_delivered": all(w["reached"] for w in waits),
            "late_opens": sum(1 for e in expired if e[4]),
            "delivered_s_from_first_deadline": (max(receipts) - first_deadline) / 1e6 if receipts else None,
            "delivered_s_from_last_deadline": (max(receipts) - last_deadline) / 1e6 if receipts else None,
            "expiry_lag_ms": stats.summary((e[2] - e[1]) / 1000 for e in expired),
            "delivery_after_deadline_ms": stats.summary((e[3] - e[1]) / 1000 for e in expired),
            "creates_per_s": made["rate"],
            "window_until_delivered": storm_cpu,
        }

    async def lag(self, pid: int) -> dict[str, Any]:
        """Expiry lag of sessions created at a steady rate (so their deadlines spread), each watched."""
        s = self.scale
        (lag_flow,) = await self.drivers[0].call("create_flows", timeouts_s=[s.lag_timeout])
        per = s.lag_sessions // len(self.watchers)
        win = Window(pid).start()
        made = await asyncio.gather(
            *(w.call("create_and_watch", n=per, inflight=8, flow_id=lag_flow, rate=per / s.lag_spread, call_timeout=LONG)
              for w in self.watchers)
        )  # fmt: skip
        waits = await asyncio.gather(
            *(w.call("wait_expired", count=len(m["created"]), timeout=s.lag_timeout + 60, call_timeout=LONG)
              for w, m in zip(self.watchers, made))
        )  # fmt: skip
        window = win.stop()
        expired = [e for r in await self.all_watchers("expired_collect") for e in r]
        return {
            "window": window,
            "late": [[e[1], e[2]] for e in expired if e[2] - e[1] > LATE_US],
            "sessions": sum(len(m["created"]) for m in made),
            "timeout_s": s.lag_timeout,
            "spread_s": s.lag_spread,
            "expired_delivered": len(expired),
            "all_delivered": all(w["reached"] for w in waits),
            "late_opens": sum(1 for e in expired if e[4]),
            "expiry_lag_ms": stats.summary((e[2] - e[1]) / 1000 for e in expired),
            "delivery_after_deadline_ms": stats.summary((e[3] - e[1]) / 1000 for e in expired),
        }

    async def polling_phase(self) -> dict[str, Any]:
        s = self.scale
        server = await start_flowsession(self.procs, self.workdir / "polling.db")
        pid = server.pid
        out: dict[str, Any] = {}
        try:
            await self.connect(server)
            (flow_id,) = await self.drivers[0].call("create_flows", timeouts_s=[None])
            ids = (await self.closed("create_sessions", flow_id=flow_id, count=s.pollers))["ids"]
            parts = split(ids, len(self.watchers))
            rate = len(ids) / s.change_every
            out.update(clients=len(ids), change_rate=rate, change_every_s=s.change_every,
                       poll_interval_s=s.poll_interval, window_s=s.poll_window)  # fmt: skip

            async def changes(*, settled: bool = False) -> tuple[dict[str, Any], dict[str, float]]:
                if not settled:
                    await settle(pid)  # streams just opened or closed, pollers just stopped
                order = list(ids)
                random.shuffle(order)  # round-robin over a shuffled order: each session every change_every s
                win = Window(pid).start()
                sent = await self.drivers[0].call("changes_paced", ids=order, rate=rate, duration=s.poll_window, call_timeout=LONG)
                return sent, win.stop()

            sent, win = await changes()
            sent.pop("per_item")
            out["changes_only"] = {"sent": sent, "window": win}
            out["changes_only_runs"] = [win]
            # polling (the pollers keep the server busy, so it is settled before they start)
            await settle(pid)
            await asyncio.gather(
                *(w.call("poll_start", ids=p, interval=s.poll_interval, call_timeout=LONG) for w, p in zip(self.watchers, parts))
            )
            sent, win = await changes(settled=True)
            per_item = sent.pop("per_item")
            waits = await asyncio.gather(
                *(w.call("wait_learned", count=expected_for(per_item, p), timeout=5 * s.poll_interval + 5, call_timeout=LONG)
                  for w, p in zip(self.watchers, parts))
            )  # fmt: skip
            polled = await self.all_watchers("poll_stop")
            out["polling"] = {
                "sent": sent,
                "window": win,
                "changes_made": sum(per_item.values()),
                "changes_learned": sum(p["learned"] for p in polled),
                "all_learned": all(w["reached"] for w in waits),
                "polls": sum(p["polls"] for p in polled),
                "skipped_versions": sum(p["skipped_versions"] for p in polled),
                "late_ticks": sum(p["late_ticks"] for p in polled),
                "errors": [p["errors"] for p in polled],
                "staleness_ms": stats.summary(x for p in polled for x in p["staleness_ms"]),
            }
            self.log(f"  polling: staleness {out['polling']['staleness_ms']}, cpu {win['server_cpu_s']:.2f} s")
            # streaming: its learning CPU is small against one window's noise, so it is the mean of paired
            # windows: the same change load with the streams open (opened just before, at the default
            # heartbeat, so their upkeep counts as polling's polls do) and with no streams at all. Pairs
            # alternate which window comes first, so a drift of the server's cost over the phase cancels.
            latencies: list[float] = []

            async def with_streams() -> dict[str, Any]:
                await self.open_streams("watch_open", ids)  # split the same way as ``parts``; all or it raises
                await self.all_watchers("watch_mark", recording=True)
                sent, win = await changes()
                per_item = sent.pop("per_item")
                waits = await asyncio.gather(
                    *(w.call("wait_received", count=expected_for(per_item, p), timeout=30.0, call_timeout=60)
                      for w, p in zip(self.watchers, parts))
                )  # fmt: skip
                collected = await self.all_watchers("watch_collect")
                await self.all_watchers("watch_close")
                latencies.extend(x for c in collected for x in c["latencies_ms"])
                return {
                    "sent": sent, "window": win, "changes_made": sum(per_item.values()),
                    "changes_learned": sum(c["received"] for c in collected), "all_learned": all(w["reached"] for w in waits),
                }  # fmt: skip

            async def without_streams() -> dict[str, Any]:
                sent, win = await changes()
                sent.pop("per_item")
                return {"baseline_sent": sent, "baseline_window": win}

            pairs = await alternating_pairs(s.stream_pairs, with_streams, without_streams)
            out["streaming"] = {
                "streams": len(ids),
                "pairs": pairs,
                "window": _mean_windows([pr["window"] for pr in pairs]),
                "changes_made": sum(pr["changes_made"] for pr in pairs),
                "changes_learned": sum(pr["changes_learned"] for pr in pairs),
                "all_learned": all(pr["all_learned"] for pr in pairs),
                "staleness_ms": stats.summary(latencies),
            }
            self.log(f"  streaming: staleness {out['streaming']['staleness_ms']}, cpu {out['streaming']['window']['server_cpu_s']:.2f} s")
            # The polling baseline: the change load alone, before polling and in every pair.
            out["changes_only_runs"] += [pr["baseline_window"] for pr in pairs]
            out["changes_only"]["window"] = _mean_windows(out["changes_only_runs"])
            if report.cpu_per_change({"polling": out})["ratio_learning"] < 100.0 and self.do_profile:
                await asyncio.gather(
                    *(w.call("poll_start", ids=p, interval=s.poll_interval, call_timeout=LONG) for w, p in zip(self.watchers, parts))
                )

                async def polls_alone() -> None:
                    await asyncio.sleep(s.profile_seconds)  # the pollers' own load is the workload profiled

                await self.maybe_profile("polling", pid, polls_alone)
                await self.all_watchers("poll_stop")
                await self.open_streams("watch_open", ids)
                order = list(ids)
                random.shuffle(order)
                await self.maybe_profile(
                    "streaming", pid,
                    lambda: self.drivers[0].call("changes_paced", ids=order, rate=rate, duration=s.profile_seconds, call_timeout=LONG),
                )  # fmt: skip
                await self.all_watchers("watch_close")
            return out
        finally:
            await self.finish(server, out)

    async def restart_phase(self) -> dict[str, Any]:
        """Reconnect storm: ``scale.large`` watchers (one facade-style follower per session, bench/worker.py
        ``_follow``) on a server on a fixed port; SIGTERM it (its watch streams end with UNAVAILABLE
        SHUTTING_DOWN + RetryInfo 1 s), once it has exited start a new one on the same port and database,
        and time every watcher's way back. Then one change to each of ``scale.small`` sessions: each of
        their watchers must get exactly that version, the others nothing."""
        s = self.scale
        db = self.workdir / "restart.db"
        address = f"127.0.0.1:{free_port()}"
        out: dict[str, Any] = {"address": address, "streams": s.large}
        old = await start_flowsession(self.procs, db, address=address, gc_path=self.workdir / "restart-old.gc.jsonl")
        server = old
        try:
            await self.connect(old)
            (flow_id,) = await self.drivers[0].call("create_flows", timeouts_s=[None])
            created = await self.closed("create_sessions", flow_id=flow_id, count=s.large)
            ids = created.pop("ids")
            if len(ids) < s.large:
                raise RuntimeError(f"only {len(ids)} of {s.large} sessions created: {created['errors']}")
            parts = split(ids, len(self.watchers))
            t0 = time.monotonic()
            opened = await asyncio.gather(
                *(w.call("follow_open", ids=p, call_timeout=LONG) for w, p in zip(self.watchers, parts))
            )
            out["open"] = {"streams": sum(o["ready"] for o in opened), "seconds": time.monotonic() - t0,
                           "initial_failures": _sum_counts(o["initial_failures"] for o in opened)}  # fmt: skip
            if out["open"]["streams"] != s.large:
                raise RuntimeError(f"only {out['open']['streams']} of {s.large} watchers live: {[o['lost'] for o in opened]}")
            self.log(f"  {s.large} watchers live on {address}; restarting the server")
            await self.all_watchers("follow_mark_restart")
            sigterm_us = time.time_ns() // 1000
            t0 = time.monotonic()
            old_exit = await old.stop(grace=20.0)
            old_stop_s = time.monotonic() - t0
            server = new = await start_flowsession(
                self.procs, db, address=address, gc_path=self.workdir / "restart-new.gc.jsonl"
            )
            win = Window(new.pid).start()
            waits = await asyncio.gather(
                *(w.call("follow_wait_back", timeout=s.restart_back_timeout, call_timeout=s.restart_back_timeout + 30)
                  for w in self.watchers)
            )  # fmt: skip
            window = win.stop()
            got = await self.all_watchers("follow_collect")
            out["restart"] = self._restart_figures(got, waits, sigterm_us, old_exit, old_stop_s, new)
            out["restart"]["window_until_back"] = window
            r = out["restart"]
            self.log(
                f"  back: {r['back']} of {r['streams']} in {_fmt_s(r['all_back_s_after_listening'])} s after the new "
                f"server's listening line; failed re-opens {r['reopen_failures']}; CANCELLED {r['cancelled']}"
            )
            # one change to each of scale.small sessions (spread over both watcher workers)
            per = s.small // len(self.watchers)
            sample = [i for p in parts for i in p[:per]]
            await self.all_watchers("follow_mark_changes")
            made = await self.drivers[0].call("report_each", ids=sample, inflight=32, call_timeout=LONG)
            versions = made["versions"]
            checks = await asyncio.gather(
                *(w.call("follow_check", changed={i: versions[i] for i in p[:per] if i in versions}, timeout=30.0,
                         call_timeout=60) for w, p in zip(self.watchers, parts))
            )  # fmt: skip
            out["resume_check"] = {
                "changes": len(sample),
                "writes_ok": len(versions),
                "write_errors": made["errors"],
                **{k: sum(c[k] for c in checks) for k in
                   ("changed", "following", "exact", "missing", "wrong", "write_not_next_version", "unchanged_with_events",
                    "gaps", "dups")},
                "all_delivered": all(c["reached"] for c in checks),
                "examples": [e for c in checks for e in c["examples"]][:5],
            }  # fmt: skip
            rc = out["resume_check"]
            # every watcher still following got exactly the next version (the ones given up are the target's miss)
            rc["all_exact"] = rc["exact"] == rc["following"] and not (
                rc["missing"] or rc["wrong"] or rc["unchanged_with_events"] or rc["gaps"] or rc["dups"]
            )
            self.log(f"  after the restart: {rc['exact']} of {len(sample)} watchers got exactly the next version; "
                     f"gaps {rc['gaps']}, dups {rc['dups']}")  # fmt: skip
            await self.all_watchers("follow_close")
            return out
        finally:
            await self.finish(server, out)
            if server is not old:
                await old.stop()
                out["gc_total_old_server"] = gc_probe.window(gc_probe.load(str(old.gc_path)), 0.0, float("inf"))

    def _restart_figures(
        self, got: list[dict[str, Any]], waits: list[dict[str, Any]], sigterm_us: int, old_exit: int | None,
        old_stop_s: float, new: ServerProc,
    ) -> dict[str, Any]:  # fmt: skip
        back_us = [t for g in got for t in g["back_us"]]
        streams = sum(g["streams"] for g in got)
        listening = new.listening_us
        stream_ends = _sum_counts(g["stream_ends"] for g in got)
        reopen_failures = _sum_counts(g["reopen_failures"] for g in got)
        cancelled = sum(v for c in (stream_ends, reopen_failures) for k, v in c.items() if k.split("/")[0] == "CANCELLED")
        ready_after: list[float] = []  # each channel: first READY after the new server's listening line
        for g in got:
            for transitions in g["channels"]:
                ready = [t for state, t in transitions if state == "READY" and t >= listening]
                if ready:
                    ready_after.append((ready[0] - listening) / 1e6)
        # when the failed re-opens happened: while the old server was still up, in the gap, or on the new one
        old_exit_us = sigterm_us + int(old_stop_s * 1e6)
        when: dict[str, dict[str, int]] = {}
        for g in got:
            for k, times in g["reopen_failure_us"].items():
                w = when.setdefault(k, {"before_old_exit": 0, "between": 0, "after_new_listening": 0})
                for t in times:
                    w["before_old_exit" if t < old_exit_us else "after_new_listening" if t >= listening else "between"] += 1
        broke = [g["broke_us_range"] for g in got]
        first_broke = min((b[0] for b in broke if b[0]), default=None)
        last_broke = max((b[1] for b in broke if b[1]), default=None)
        return {
            "streams": streams,
            "back": len(back_us),
            "all_back": len(back_us) == streams and all(w["reached"] for w in waits),
            "lost": _sum_counts(g["lost"] for g in got),
            "never_broke": sum(g["never_broke"] for g in got),
            "broke_not_back": sum(g["broke_not_back"] for g in got),
            "cancelled": cancelled,
            "stream_ends": stream_ends,
            "reopen_failures": reopen_failures,
            "reopen_failures_total": sum(reopen_failures.values()),
            "reopen_failures_when": when,
            "error_samples": {k: v for g in got for k, v in g["samples"].items()},
            "old_server": {"exit_code": old_exit, "sigterm_to_exit_s": old_stop_s},
            "new_server": {"start_s": new.started_s, "sigterm_to_listening_s": (listening - sigterm_us) / 1e6},
            "streams_broken_s_after_sigterm": [(first_broke - sigterm_us) / 1e6 if first_broke else None,
                                               (last_broke - sigterm_us) / 1e6 if last_broke else None],  # fmt: skip
            "all_back_s_after_listening": (max(back_us) - listening) / 1e6 if back_us else None,
            "all_back_s_after_sigterm": (max(back_us) - sigterm_us) / 1e6 if back_us else None,
            "back_after_listening_ms": stats.summary((t - listening) / 1000.0 for t in back_us),
            "reconnect_ms": stats.summary(x for g in got for x in g["reconnect_ms"]),
            "failed_reopens_per_stream": stats.summary(x for g in got for x in g["failed_reopens"]),
            "channels_ready_s_after_listening": {"channels": len(ready_after), "min": min(ready_after, default=None),
                                                 "max": max(ready_after, default=None)},  # fmt: skip
            "gaps": sum(g["gaps"] for g in got),
            "dups": sum(g["dups"] for g in got),
            "resume_rules": got[0]["facade"] if got else None,
            "timeout_s": self.scale.restart_back_timeout,
        }

    async def run(self) -> dict[str, Any]:
        await self.start_workers()
        results: dict[str, Any] = {"scale": asdict(self.scale)}
        results["bare"] = await self.timed("bare", self.bare_phase, 360)
        results["main"] = await self.timed("main", lambda: self.main_phase(results["bare"]["echo"]["rate"]), 300)
        results["expiry"] = await self.timed("expiry", lambda: self.expiry_phase(results["main"]["memory"]["opens_per_s"]), 240)
        results["polling"] = await self.timed("polling", self.polling_phase, 420)
        try:  # a failed storm is a finding, not a reason to lose the other phases' figures
            results["restart"] = await self.timed("restart", self.restart_phase, 120)
        except Exception as exc:  # noqa: BLE001 - recorded; the target fails with it
            self.log(f"phase restart failed: {exc!r}")
            results["restart"] = {"error": repr(exc)[:2000]}
        results["phase_seconds"] = self.phase_seconds
        results["profiles"] = self.profiles
        return results

    async def close(self) -> None:
        await self.procs.stop_all()
