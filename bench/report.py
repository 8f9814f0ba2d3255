"""Targets, ratios to the bare grpc.aio server, and the three outputs: JSON, markdown table, PNG chart."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

KB = 1000  # "50 KB per stream" is read as 50,000 bytes (the stricter reading)
CPU_TICK_S = 0.01  # psutil's process CPU times count clock ticks (1/100 s)


METHOD = {
    "processes": "each phase starts its own server (fresh SQLite file in a temp dir, default flags but --synchronous FULL given explicitly, no FLOWSESSION_* variables) on "
    "127.0.0.1:0; load comes from 4 separate client processes (2 watchers/pollers with 4 HTTP/2 channels each, "
    "2 drivers with 2 channels each) using grpc.aio; servers run under bench/gc_probe.py, which times every "
    "garbage collection and changes nothing else; server code is a snapshot taken when the run started",
    "watch_latency": "one WatchSession per session (flow: step liveness routes retry->liveness), every stream's first "
    "event awaited before measuring; a driver sends ReportStepResult(retry) open-loop at the stated rate round-robin "
    "over the watched sessions in shuffled order; latency = client receipt wall clock - the event's event_time "
    "(the server's clock when the writer ran the change, before COMMIT); every event of the run, after all arrived; "
    "each run starts once the server has used under 20% of a core for 0.5 s (after closing streams or a profile "
    "re-run it still has queued work; latency runs record the wait as settled_s)",
    "bare_latency": "same client setup against bench/bare_server.py: a Publish unary RPC stamps time.time() and puts "
    "one message (408 bytes) on the in-memory queue of the key's stream; the bare server's garbage collector is tuned as "
    "flowsession serve's (cli.tune_gc)",
    "bare_storm": "with the 10,000 bare streams of the latency run open, one PublishAll call puts one message, stamped "
    "once, on every stream's queue; figure = last receipt - the stamp",
    "bare_polling": "the polling phase's clients and rates against the bare server: pollers call Echo (408 bytes) "
    "every 1 s with a random phase; changes are Publish calls paced at clients / change_every_s; a poll's CPU = the "
    "polling window's server CPU per poll; a delivery's = the mean over stream_pairs alternating pairs of the same "
    "publishes with the streams open minus with none, per publish (half as many pairs as the polling phase); the "
    "ratio = polls per change x a poll / a delivery at mean + 2 standard errors",
    "memory_per_stream": "server RSS after opening the streams (each answered) minus RSS before, divided by the count",
    "idle_cpu": "server user+system CPU (psutil) while the streams sit idle for the stated seconds, from the moment "
    "the last one opened; a full run's window is one heartbeat interval (30 s), so it holds every stream's first "
    "heartbeat (covers_heartbeat); a ratio to a bare figure of a few clock ticks is a lower bound",
    "throughput": "closed loop: 2 drivers x 32 calls in flight; created/s with CreateSession, changes/s with "
    "ReportStepResult (0 watchers: over every session created so far, none watched; with watchers: over the watched ones)",
    "echo": "the same closed loop against the bare server's Echo (64-byte payload)",
    "expiry_storm": "one flow per 25 ms of execution_timeout; each create (8 in flight) picks the flow that puts its "
    "expire_time nearest a shared deadline; all sessions watched before the deadline; figure = last EXPIRED receipt "
    "- earliest expire_time",
    "expiry_lag": "sessions created at a steady rate, each watched from its creation; lag = EXPIRED event_time - "
    "expire_time",
    "polling_vs_streaming": "one client per session, one change per session every change_every_s on average (paced "
    "round-robin); pollers call GetSession every 1 s with a random phase; staleness = receipt - update_time of the "
    "newly seen version (polling) or receipt - event_time (streaming); polling's learning CPU = server CPU during "
    "the window minus the mean of the same change load with no clients (one run before polling, one in every "
    "streaming pair); streaming's = the mean over stream_pairs paired windows of the server CPU during the same "
    "change load with one WatchSession per session (opened just before the window, default 30 s heartbeat, so the "
    "streams' upkeep counts as the polls do) minus the load with no streams; pairs alternate which window runs "
    "first, so a drift over the phase cancels; the ratio takes streaming's at mean + 2 standard errors, so it is a "
    "lower bound",
    "profiles": "only for missed targets: py-spy record --gil --native on the server during a re-run of the workload",
    "restart": "a server on a fixed loopback port (picked free, below the ephemeral range) with one WatchSession per "
    "RUNNING session, opened by facade-style followers (bench/worker.py _follow: resumes on what "
    "flowsession.client._resumable resumes on, after the status's RetryInfo delay or else flowsession.client._backoff, "
    "wait_for_ready=True, no deadline, gives up on anything else as the facade raises it), all live; then SIGTERM, "
    "and once it has exited a new server on the same port and database; every watcher's channel reconnects by itself "
    "(gRPC's connection backoff). A watcher is back at the first message of a re-open after its stream was ended; "
    "re-opens ask for after_version = last - 1 so the server replays the boundary event (exactly version last, "
    "checked, dropped as the facade drops version <= last) rather than sending nothing until the next change or the "
    "30 s heartbeat. Failed re-opens counted by status code and ErrorInfo reason (a code alone: no ErrorInfo, i.e. "
    "not from flowsession's code). Then one ReportStepResult on each of 1,000 sessions (100 quick): each of their "
    "watchers must get exactly the version the write returned, the other watchers nothing",
}


def idle_ratio(ours: float, bare: float) -> str:
    """ours / bare for CPU-second readings: a bare reading under 10 ticks is as much as one tick low, so
    the ratio is then given as the lower bound it is."""
    if bare < 10 * CPU_TICK_S:
        return f"≥ {ours / (bare + CPU_TICK_S):.0f}x"
    return f"{ours / bare:.1f}x"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _get(d: dict[str, Any], *path: str) -> Any:
    for p in path:
        if d is None:
            return None
        d = d.get(p)
    return d


def _per_change(cpu_s: float, learning_s: float, seconds: float, changes: float) -> dict[str, float]:
    minutes = seconds / 60.0
    return {
        "server_cpu_s": cpu_s,
        "cpu_s_per_minute": cpu_s / minutes,
        "learning_cpu_s": learning_s,
        "learning_cpu_s_per_minute": learning_s / minutes,
        "cpu_ms_per_change": 1000.0 * cpu_s / changes,
        "learning_cpu_ms_per_change": 1000.0 * learning_s / changes,
    }


def cpu_per_change(results: dict[str, Any]) -> dict[str, Any]:
    """Server CPU per change learned, polling against streaming: total, and net of the same change load
    with no learners (the cost of learning itself). Streaming's learning cost is the mean of paired
    differences; the ratio uses its upper bound (mean + 2 standard errors), so it errs against streaming."""
    p = results["polling"]
    base = statistics.fmean(w["server_cpu_s"] for w in p["changes_only_runs"])
    out: dict[str, Any] = {"changes_only_cpu_s": base}
    poll = p["polling"]
    out["polling"] = _per_change(
        poll["window"]["server_cpu_s"], poll["window"]["server_cpu_s"] - base, poll["window"]["seconds"],
        max(1, poll["changes_made"]),
    )  # fmt: skip
    st = p["streaming"]
    # Results from before the paired windows have one streaming window against the baseline.
    pairs = st.get("pairs") or [{"window": st["window"], "baseline_window": {"server_cpu_s": base}, "changes_made": st["changes_made"]}]
    diffs, mean, se, upper = _paired(pairs)
    per_window = max(1.0, statistics.fmean(pr["changes_made"] for pr in pairs))
    out["streaming"] = _per_change(
        statistics.fmean(pr["window"]["server_cpu_s"] for pr in pairs), mean,
        statistics.fmean(pr["window"].get("seconds", p.get("window_s", 30.0)) for pr in pairs), per_window,
    )  # fmt: skip
    out["streaming"].update(
        pair_diffs_s=diffs, learning_cpu_s_se=se, learning_cpu_s_upper=upper,
        learning_cpu_ms_per_change_upper=1000.0 * upper / per_window,
    )  # fmt: skip
    poll_learning = out["polling"]["learning_cpu_ms_per_change"]
    out["ratio_learning"] = poll_learning / out["streaming"]["learning_cpu_ms_per_change_upper"]
    point = out["streaming"]["learning_cpu_ms_per_change"]
    out["ratio_learning_point"] = poll_learning / point if point > 0 else None
    out["ratio_total"] = out["polling"]["cpu_ms_per_change"] / max(out["streaming"]["cpu_ms_per_change"], 1e-9)
    if "polling" in results.get("bare", {}):
        out["bare"] = _bare_cpu_per_change(results["bare"]["polling"], p["change_every_s"] / p["poll_interval_s"])
    return out


def _cpu_us(window: dict[str, Any], count: int) -> float:
    """Server CPU per call (or change, or poll) in µs over a measurement window."""
    return 1e6 * window["server_cpu_s"] / max(count, 1)


def _paired(pairs: list[dict[str, Any]]) -> tuple[list[float], float, float, float]:
    """Per pair, the window with streams minus the one without: the differences, their mean and standard
    error, and the mean + 2 standard errors the ratios use (so they err against streaming)."""
    diffs = [pr["window"]["server_cpu_s"] - pr["baseline_window"]["server_cpu_s"] for pr in pairs]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else abs(mean)
    # Below 10 ms of CPU per window the difference is beyond what the CPU counters resolve.
    return diffs, mean, se, max(mean + 2 * se, 0.010)


def _bare_cpu_per_change(bp: dict[str, Any], polls_per_change: float) -> dict[str, Any]:
    """The bare stack's ratio at the polling phase's polls per change: a poll is an Echo, a delivery a
    message on a bare stream."""
    poll_us = _cpu_us(bp["polling"]["window"], bp["polling"]["polls"])
    pairs = bp["streaming"]["pairs"]
    diffs, mean, se, upper = _paired(pairs)
    per_window = max(1.0, statistics.fmean(pr["sent"] for pr in pairs))
    learning_us = polls_per_change * poll_us
    return {
        "poll_us": poll_us, "polls_per_change": polls_per_change, "polling_learning_us_per_change": learning_us,
        "polling_cpu_s_per_minute": 60.0 * bp["polling"]["window"]["server_cpu_s"] / bp["polling"]["window"]["seconds"],
        "delivery_us": 1e6 * mean / per_window, "delivery_us_upper": 1e6 * upper / per_window, "pair_diffs_s": diffs,
        "ratio_learning": learning_us * per_window / (1e6 * upper),
        "ratio_learning_point": learning_us * per_window / (1e6 * mean) if mean > 0 else None,
    }  # fmt: skip


def undelivered(run: dict[str, Any] | None) -> int:
    """Events the run made but its watchers never received (0 when every one arrived). The latency,
    storm and lag figures are taken over the events that arrived, so they say nothing of the others."""
    if not run or run.get("all_delivered", True):
        return 0
    expected = run.get("expected", run.get("sessions", 0))
    got = run.get("delivered", run.get("expired_delivered", 0))
    return max(1, expected - got)


def _target(
    key: str, name: str, value: float | None, unit: str, op: str, limit: float, *, compare: float | None = None,
    bare: float | None = None, detail: str = "", missing: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """op "<=": value must not exceed limit. op ">=": value must reach limit. ``compare`` is what is
    held against the limit when it is not ``value`` itself (a ratio). ``missing``: events never
    received, so the figure (over the ones that were) cannot pass."""
    held = value if compare is None else compare
    passed = held is not None and (held <= limit if op == "<=" else held >= limit) and not missing
    entry: dict[str, Any] = {
        "key": key, "name": name, "value": value, "unit": unit, "target": f"{op} {limit:g}",
        "compared": held, "pass": passed, "bare": bare, "ratio_to_bare": _ratio(value, bare), "detail": detail,
    }  # fmt: skip
    if missing:
        entry["undelivered"] = missing
    if not passed and held is not None:
        if op == "<=":
            entry["miss_by"] = held - limit
            entry["miss_by_factor"] = held / limit
        else:
            entry["miss_by"] = limit - held
            entry["miss_by_pct"] = 100.0 * (limit - held) / limit
    return entry


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    s = results["scale"]
    bare, main, exp = results["bare"], results["main"], results["expiry"]
    echo = bare["echo"]["rate"]
    cpc = results["cpu_per_change"]
    t = [
        _target(
            "watch_p99_small", f"WatchSession delivery p99, {s['small']:,} streams, {s['change_rate']:,.0f} changes/s",
            _get(main, "latency_small", "latency_ms", "p99"), "ms", "<=", 5.0,
            bare=_get(bare, "latency_small", "latency_ms", "p99"), missing=undelivered(main.get("latency_small")),
        ),  # fmt: skip
        _target(
            "watch_p99_large", f"WatchSession delivery p99, {s['large']:,} streams, {s['change_rate']:,.0f} changes/s",
            _get(main, "latency_large", "latency_ms", "p99"), "ms", "<=", 10.0,
            bare=_get(bare, "latency_large", "latency_ms", "p99"), missing=undelivered(main.get("latency_large")),
        ),  # fmt: skip
        _target(
            "memory_per_stream", f"server memory per idle stream ({s['large']:,} streams)",
            main["memory"]["per_stream_bytes"] / KB, "KB", "<=", 50.0, bare=bare["memory"]["per_stream_bytes"] / KB,
        ),  # fmt: skip
        _target(
            "changes_0", f"status changes/s at {s['inflight']} in flight, 0 watchers (vs 0.75 x bare echo)",
            main["change_0"]["rate"], "/s", ">=", 0.75, compare=_ratio(main["change_0"]["rate"], echo), bare=echo,
            detail="compared: changes/s divided by the bare echo RPC rate",
        ),  # fmt: skip
        _target(
            "changes_w", f"status changes/s at {s['inflight']} in flight, {s['small']:,} watchers (vs 0.75 x bare echo)",
            main["change_w"]["rate"], "/s", ">=", 0.75, compare=_ratio(main["change_w"]["rate"], echo), bare=echo,
            detail="compared: changes/s divided by the bare echo RPC rate",
        ),  # fmt: skip
        _target("expiry_lag_p99", "expiry lag p99 (event_time - expire_time), sessions spread in time",
                _get(exp, "lag", "expiry_lag_ms", "p99"), "ms", "<=", 50.0, missing=undelivered(exp.get("lag"))),  # fmt: skip
        _target(
            "storm_delivered", f"expiry storm: {s['storm']:,} sessions, first deadline -> last EXPIRED delivered",
            _get(exp, "storm", "delivered_s_from_first_deadline"), "s", "<=", 3.0, bare=_get(bare, "storm", "delivered_s"),
            missing=undelivered(exp.get("storm")),
        ),  # fmt: skip
        _target(
            "streaming_vs_polling", "server CPU per change learned: 1 s polling / streaming",
            cpc["ratio_learning"], "x", ">=", 100.0, bare=_get(cpc, "bare", "ratio_learning"),
            detail="learning CPU: server CPU with the learners minus the same change load with none; streaming's "
            "taken at its upper bound, so the ratio is a lower bound",
        ),  # fmt: skip
    ]
    if "restart" in results:
        t.append(restart_target(results))
    return t


def restart_target(results: dict[str, Any]) -> dict[str, Any]:
    """All watchers back after the restart, and no CANCELLED among their stream ends and failed re-opens."""
    s = results["scale"]
    phase = results["restart"]
    r = phase.get("restart") or {}
    streams = r.get("streams") or s["large"]
    entry = _target(
        "restart_all_back", f"{streams:,} watchers back after a restart: all, with no bare CANCELLED",
        r.get("back"), "streams", ">=", float(streams),
        detail="value: watchers back (first message of a re-open) within the phase's bound; also fails on any "
               "CANCELLED stream end or re-open (the client facade raises CANCELLED instead of resuming)",
    )  # fmt: skip
    entry["cancelled"] = r.get("cancelled")
    if r.get("cancelled"):
        entry["pass"] = False
    if "error" in phase:
        entry["pass"] = False
        entry["error"] = phase["error"]
    return entry


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        if math.isinf(v):
            return "inf"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.{digits}f}" if abs(v) >= 1 or v == 0 else f"{v:.{max(digits, 2)}f}"
    return str(v)


def _gc_fact(window: dict[str, Any] | None, what: str) -> str | None:
    gc = (window or {}).get("gc")
    if not gc:
        return None
    total = sum(gc["ms_by_generation"])
    return (
        f"garbage collector during {what}: {total:.0f} ms over {window['seconds']:.1f} s "
        f"({sum(gc['collections_by_generation']):,} collections, gen0/1/2 {gc['collections_by_generation']}), "
        f"longest pause {gc['longest_pause_ms']:.0f} ms, {gc['pauses_over_10ms']} pauses >= 10 ms, {gc['pauses_over_50ms']} >= 50 ms"
    )


def _stall_fact(window: dict[str, Any] | None, what: str) -> str | None:
    stalls = (window or {}).get("disk_stalls_ms")
    if not stalls:
        return None
    return (
        f"disk stalls during {what}: the server logged {len(stalls)} commit(s) of {', '.join(f'{ms:.0f}' for ms in stalls)} ms; "
        f"the first commit of a stall runs on the event loop and holds it that long, then commits run on the disk "
        f"thread for 10 s, where each waits for the GIL (README, Group commit)"
    )


SATURATED_PCT = 85.0  # server CPU (% of a core) from which its one core for Python counts as full


def load_fact(window: dict[str, Any], rate: float) -> str:
    """What the run's CPU readings say about why deliveries waited: the server's own core full, the
    machine full (the server waited for a core), or neither."""
    pct, machine = window["server_cpu_pct_of_core"], window["machine_busy_pct"]
    if pct >= SATURATED_PCT:
        return (f"at {rate:,.0f} changes/s the server used {pct:.0f}% of the one core its Python code can use, "
                f"so changes queue behind each other")  # fmt: skip
    if machine >= 90.0:
        return (f"the server used only {pct:.0f}% of a core while the machine was {machine:.0f}% busy: it (or the "
                f"client workers) waited for a core, so this run measured the shared machine more than the server")  # fmt: skip
    return (f"the server used only {pct:.0f}% of a core and the machine was {machine:.0f}% busy: not CPU-bound; "
            f"see the garbage-collector pauses and disk stalls below")  # fmt: skip


def notes_for(target: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """Facts for a missed target: by how much, the load around it, and py-spy's top frames if profiled."""
    main, bare = results["main"], results["bare"]
    profiles = results.get("profiles", {})
    key = target["key"]
    facts: list[str] = []
    if target.get("undelivered"):
        facts.append(
            f"{target['undelivered']:,} events were never received within the wait: the figure covers only the "
            f"events that arrived, so it cannot pass"
        )
    if "miss_by_factor" in target:
        facts.append(f"missed by {_fmt(target['miss_by'], 2)} {target['unit']} ({target['miss_by_factor']:.2f}x the target)")
    elif "miss_by_pct" in target:
        facts.append(f"missed by {_fmt(target['miss_by'], 3)} ({target['miss_by_pct']:.0f}% short of the target)")
    profile_key = None
    if key in ("watch_p99_small", "watch_p99_large"):
        size = "small" if key.endswith("small") else "large"
        run, brun = main[f"latency_{size}"], bare[f"latency_{size}"]
        lat, blat = run["latency_ms"], brun["latency_ms"]
        facts.append(
            f"p50 {_fmt(lat['p50'], 2)} ms / p99 {_fmt(lat['p99'], 2)} ms / max {_fmt(lat['max'], 1)} ms against the bare "
            f"grpc.aio stream's p50 {_fmt(blat['p50'], 2)} / p99 {_fmt(blat['p99'], 2)} / max {_fmt(blat['max'], 1)} ms "
            f"at the same stream count and rate"
        )
        facts.append(
            f"server CPU {run['window']['server_cpu_pct_of_core']:.0f}% of a core, machine {run['window']['machine_busy_pct']:.0f}% "
            f"busy during the run (bare: {brun['window']['server_cpu_pct_of_core']:.0f}% / {brun['window']['machine_busy_pct']:.0f}%)"
        )
        sent, bsent = run["sent"], brun["sent"]
        facts.append(
            f"server CPU per change {_cpu_us(run['window'], sent['done']):,.0f} µs against "
            f"{_cpu_us(brun['window'], bsent['done']):,.0f} µs per bare publish and delivery; "
            + load_fact(run["window"], run["rate"])
        )
        if sent.get("skipped"):
            facts.append(
                f"the driver made {sent['done']:,} of {sent['planned']:,} planned changes ({sent['skipped']:,} ticks skipped "
                f"with 2,000 calls outstanding): the server fell behind the rate"
            )
        half = main.get(f"latency_{size}_half_rate")
        if half:
            hl = half["latency_ms"]
            facts.append(
                f"at half the rate ({half['rate']:,.0f} changes/s, same streams): p50 {_fmt(hl['p50'], 2)} / p99 {_fmt(hl['p99'], 2)} / "
                f"max {_fmt(hl['max'], 1)} ms, server CPU {half['window']['server_cpu_pct_of_core']:.0f}% of a core"
            )
        facts.append("latency runs from event_time, read by the writer before COMMIT, so it includes the fsync of each group commit")
        facts.append(_gc_fact(run["window"], "the run"))
        facts.append(_stall_fact(run["window"], "the run"))
        profile_key = f"watch_latency_{size}"
    elif key in ("changes_0", "changes_w"):
        run = main["change_0" if key == "changes_0" else "change_w"]
        facts.append(
            f"{_fmt(run['rate'])} changes/s against {_fmt(bare['echo']['rate'])} bare echo RPCs/s; server CPU "
            f"{run['window']['server_cpu_pct_of_core']:.0f}% of a core (bare echo: {bare['echo']['window']['server_cpu_pct_of_core']:.0f}%), "
            f"machine {run['window']['machine_busy_pct']:.0f}% busy"
        )
        echo = bare["echo"]
        facts.append(
            f"server CPU per change {_cpu_us(run['window'], run['done']):,.0f} µs against "
            f"{_cpu_us(echo['window'], echo['done']):,.0f} µs per bare echo: on top of gRPC's "
            f"own cost of a unary call, a change runs its writer command (read, decide, UPDATE, INSERT, JSON) and "
            f"converts the session to protobuf, all on the one core Python runs on"
        )
        if key == "changes_w":
            bare_run, base = bare["latency_small"], main["change_0"]
            bare_delivery = _cpu_us(bare_run["window"], bare_run["sent"]["done"]) - _cpu_us(echo["window"], echo["done"])
            facts.append(
                f"the watchers add {_cpu_us(run['window'], run['done']) - _cpu_us(base['window'], base['done']):,.0f} "
                f"µs of server CPU per change (one "
                f"delivery each; CPU per change with them minus without); a bare stream message adds about "
                f"{bare_delivery:,.0f} µs to a bare call (a publish delivered to {bare_run['streams']:,} streams' "
                f"keys at {bare_run['rate']:,.0f}/s, minus an echo)"
            )
        facts.append(_gc_fact(run["window"], "the run"))
        profile_key = "status_changes"
    elif key == "memory_per_stream":
        facts.append(
            f"bare grpc.aio holds {bare['memory']['per_stream_bytes'] / KB:.1f} KB per idle stream of that "
            f"(RSS before/after opening, same client setup)"
        )
    elif key == "storm_delivered":
        st = results["expiry"]["storm"]
        facts.append(
            f"deadlines spread {st['deadline_spread_ms']['full']:.0f} ms (first to last); last EXPIRED delivered "
            f"{_fmt(st['delivered_s_from_last_deadline'], 2)} s after the last deadline; expiry lag p50 "
            f"{_fmt(st['expiry_lag_ms']['p50'])} / p99 {_fmt(st['expiry_lag_ms']['p99'])} ms; delivery after the deadline "
            f"p50 {_fmt(st['delivery_after_deadline_ms']['p50'])} / p99 {_fmt(st['delivery_after_deadline_ms']['p99'])} ms"
        )
        facts.append(
            f"server CPU {st['window_until_delivered']['server_cpu_pct_of_core']:.0f}% of a core from the watches' opening "
            f"until the last delivery"
        )
        facts.append(_gc_fact(st["window_until_delivered"], "that time"))
        bs = bare.get("storm")
        if bs and bs.get("delivered_s") is not None:
            facts.append(
                f"the bare grpc.aio server, with one message put on each of its {bs['pushed']:,} streams at one moment, "
                f"delivered the last {bs['delivered_s']:.2f} s later using {bs['window']['server_cpu_s']:.2f} CPU-s: "
                f"the stack's own share of the storm; here the writes (expiring the sessions in batches of 1,000) and "
                f"the conversion of every event to its message come on top, on the same core"
            )
        profile_key = "expiry_storm"
    elif key == "expiry_lag_p99":
        lag = results["expiry"]["lag"]
        facts.append(f"lag p50 {_fmt(lag['expiry_lag_ms']['p50'])} / max {_fmt(lag['expiry_lag_ms']['max'])} ms")
        if "late_during_gc_pause" in lag:
            facts.append(
                f"{len(lag['late'])} sessions expired more than 50 ms late; {lag['late_during_gc_pause']} of them had a "
                f"garbage-collector pause of >= 5 ms between their expire_time and their EXPIRED event"
            )
        facts.append(_gc_fact(lag.get("window"), "the run"))
        profile_key = "expiry_lag"
    elif key == "streaming_vs_polling":
        cpc = results["cpu_per_change"]
        p = results["polling"]
        facts.append(
            f"one change per session every {p['change_every_s']:.0f} s on average, so a 1 s poller makes about "
            f"{p['change_every_s'] / p['poll_interval_s']:.0f} polls per change learned"
        )
        facts.append(
            f"learning CPU per change: polling {cpc['polling']['learning_cpu_ms_per_change']:.2f} ms, streaming "
            f"{cpc['streaming']['learning_cpu_ms_per_change']:.3f} ms; with the writes included "
            f"{cpc['polling']['cpu_ms_per_change']:.2f} ms against {cpc['streaming']['cpu_ms_per_change']:.2f} ms "
            f"({cpc['ratio_total']:.1f}x)"
        )
        b = cpc.get("bare")
        if b:
            point = f"{b['ratio_learning_point']:.0f}x" if b.get("ratio_learning_point") else "not resolved"
            below = b.get("ratio_learning_point") is not None and b["ratio_learning_point"] < 100.0
            facts.append(
                f"the bare grpc.aio server under the same clients and rates (Echo polls, Publish changes, its own "
                f"streams): one poll {b['poll_us']:,.0f} µs, one delivery {b['delivery_us']:,.0f} µs (upper bound "
                f"{b['delivery_us_upper']:,.0f} µs), so the stack itself measures {point} (lower bound "
                f"{b['ratio_learning']:.0f}x) at {b['polls_per_change']:.0f} polls per change"
                + (": below the target before any of our work is added" if below else "")
            )
            poll_us = 1000.0 * cpc["polling"]["learning_cpu_ms_per_change"] / (p["change_every_s"] / p["poll_interval_s"])
            delivery_us = 1000.0 * cpc["streaming"]["learning_cpu_ms_per_change_upper"]
            facts.append(
                f"the ratio grows with the time between two changes of a session: at our costs (one poll {poll_us:,.0f} "
                f"µs, one delivery at most {delivery_us:,.0f} µs) 1 s polling costs 100x streaming once a session "
                f"changes no more often than every {100.0 * delivery_us / poll_us * p['poll_interval_s']:.0f} s"
            )
        sc = cpc["streaming"]
        facts.append(
            f"streaming's learning CPU per {p['window_s']:.0f} s window: {sc['learning_cpu_s']:.3f} s ± "
            f"{sc['learning_cpu_s_se']:.3f} s (mean and standard error of {len(sc['pair_diffs_s'])} paired windows), "
            f"taken as {sc['learning_cpu_s_upper']:.3f} s for the ratio; point estimate "
            + (f"{cpc['ratio_learning_point']:.0f}x" if cpc.get("ratio_learning_point") else "not resolved (at or below 0)")
        )
        profile_key = "polling"
    elif key == "restart_all_back":
        facts.extend(_restart_facts(results, target))
    note: dict[str, Any] = {"facts": [f for f in facts if f]}
    found = profiles.get(profile_key) if profile_key else None
    if found and found.get("samples"):
        note["profile"] = {
            "workload": profile_key,
            "tool": f"py-spy record --gil --native, {found['rate_hz']} Hz for {found['seconds']:.0f} s during a re-run "
                    "of the same workload; shares are of samples where a server thread held the GIL",
            "samples": found["samples"],
            "top_self": found["top_self"],
            "top_inclusive": found["top_inclusive"],
        }
        if profile_key == "polling" and profiles.get("streaming", {}).get("samples"):
            other = profiles["streaming"]
            note["profile"]["streaming_top_self"] = other["top_self"]
            note["profile"]["streaming_top_inclusive"] = other["top_inclusive"]
    return note


def _counts(counts: dict[str, int] | None, limit: int = 4) -> str:
    if not counts:
        return "none"
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{k} {v:,}" for k, v in items[:limit])
    return text + (f", {len(items) - limit} more" if len(items) > limit else "")


def _restart_facts(results: dict[str, Any], target: dict[str, Any]) -> list[str]:
    phase = results["restart"]
    if "error" in phase:
        return [f"the phase failed: {phase['error']}"]
    r = phase["restart"]
    facts = [
        f"{r['back']:,} of {r['streams']:,} watchers back; given up (the facade would have raised): {_counts(r['lost'])}; "
        f"ended but not back within {r['timeout_s']:.0f} s: {r['broke_not_back']:,}; never ended by the restart: {r['never_broke']:,}",
        f"CANCELLED: {r['cancelled']:,} (stream ends: {_counts(r['stream_ends'])}; failed re-opens: {_counts(r['reopen_failures'])})",
    ]
    for k, v in (r.get("error_samples") or {}).items():
        facts.append(f"a status without ErrorInfo, {k}: {v}")
    when = r.get("reopen_failures_when") or {}
    if when:
        facts.append("failed re-opens, when: " + "; ".join(
            f"{k}: {w['before_old_exit']:,} before the old server exited, {w['between']:,} in between, "
            f"{w['after_new_listening']:,} after the new one was listening" for k, w in when.items()))  # fmt: skip
    if "CANCELLED" in r["reopen_failures"] or "CANCELLED" in r["stream_ends"]:  # no ErrorInfo: not ours
        facts.append(
            "a CANCELLED without ErrorInfo never reached flowsession's code: grpc core cancels calls that arrive while "
            "more than grpc.server.max_pending_requests (default 1,000; random early rejection up to "
            "grpc.server.max_pending_requests_hard_limit, default 3,000) are waiting for the application to pick them up"
        )
    facts.append(
        f"old server: SIGTERM -> exit {_fmt(r['old_server']['sigterm_to_exit_s'], 2)} s (exit code {r['old_server']['exit_code']}); "
        f"new server listening {_fmt(r['new_server']['sigterm_to_listening_s'], 2)} s after the SIGTERM; channels READY "
        f"{_fmt(r['channels_ready_s_after_listening']['min'], 2)}-{_fmt(r['channels_ready_s_after_listening']['max'], 2)} s after that"
    )
    return facts


def table(results: dict[str, Any], targets: list[dict[str, Any]]) -> str:
    s = results["scale"]
    bare, main, exp, cpc = results["bare"], results["main"], results["expiry"], results["cpu_per_change"]
    by_key = {t["key"]: t for t in targets}

    def verdict(key: str) -> str:
        t = by_key[key]
        if t["pass"]:
            return "pass"
        if t.get("error"):
            return "**miss** (phase failed)"
        if t.get("cancelled"):
            return f"**miss** ({t['cancelled']:,} CANCELLED)"
        if t.get("undelivered"):
            return f"**miss** ({t['undelivered']:,} undelivered)"
        if "miss_by_factor" in t:
            return f"**miss** ({t['miss_by_factor']:.1f}x)"
        if "miss_by_pct" in t:
            return f"**miss** ({t['miss_by_pct']:.0f}% short)"
        return "**miss**"

    rows: list[tuple[str, str, str, str, str, str]] = []

    def lat_row(label: str, ours: dict[str, Any], theirs: dict[str, Any], key: str, target: str) -> None:
        o, b = ours["latency_ms"], theirs["latency_ms"]
        rows.append((
            label,
            f"{_fmt(o['p50'], 2)} / {_fmt(o['p99'], 2)} / {_fmt(o['max'])}",
            f"{_fmt(b['p50'], 2)} / {_fmt(b['p99'], 2)} / {_fmt(b['max'])}",
            f"{_fmt(_ratio(o['p99'], b['p99']))}x (p99)", target, verdict(key),
        ))  # fmt: skip

    lat_row(f"Watch delivery p50/p99/max ms, {s['small']:,} streams, {s['change_rate']:,.0f} changes/s",
            main["latency_small"], bare["latency_small"], "watch_p99_small", "p99 ≤ 5 ms")  # fmt: skip
    lat_row(f"Watch delivery p50/p99/max ms, {s['large']:,} streams, {s['change_rate']:,.0f} changes/s",
            main["latency_large"], bare["latency_large"], "watch_p99_large", "p99 ≤ 10 ms")  # fmt: skip
    m, bm = main["memory"]["per_stream_bytes"] / KB, bare["memory"]["per_stream_bytes"] / KB
    rows.append((f"Server memory per idle stream (KB, {s['large']:,} streams)", _fmt(m), _fmt(bm),
                 f"{_fmt(_ratio(m, bm))}x", "≤ 50 KB", verdict("memory_per_stream")))  # fmt: skip
    i, bi = main["idle"], bare["idle"]
    no_heartbeat = "; no heartbeat in the window" if i.get("covers_heartbeat") is False else ""
    rows.append((
        f"Server CPU, {s['large']:,} idle streams (CPU-s per {s['idle_window']:.0f} s{no_heartbeat})",
        f"{i['server_cpu_s']:.2f} ({i['server_cpu_pct_of_core']:.1f}% core)",
        f"{bi['server_cpu_s']:.2f} ({bi['server_cpu_pct_of_core']:.1f}% core)",
        idle_ratio(i["server_cpu_s"], bi["server_cpu_s"]), "—", "—",
    ))  # fmt: skip
    echo = bare["echo"]["rate"]
    for key, label in (("create_0", "Sessions created/s, 0 watchers"), ("create_w", f"Sessions created/s, {s['small']:,} watchers")):
        r = main[key]["rate"]
        rows.append((f"{label} ({s['inflight']} in flight)", _fmt(r), f"{_fmt(echo)} (echo)", f"{_ratio(r, echo):.2f}x", "—", "—"))
    for key, label in (("changes_0", "Status changes/s, 0 watchers"), ("changes_w", f"Status changes/s, {s['small']:,} watchers")):
        r = by_key[key]["value"]
        rows.append((f"{label} ({s['inflight']} in flight)", _fmt(r), f"{_fmt(echo)} (echo)", f"{_ratio(r, echo):.2f}x",
                     "≥ 0.75x echo", verdict(key)))  # fmt: skip
    st = exp["storm"]
    rows.append((
        f"Expiry storm, {st['sessions']:,} sessions, deadlines within {st['deadline_spread_ms']['full']:.0f} ms: "
        f"first deadline → all EXPIRED delivered (s)",
        _fmt(st["delivered_s_from_first_deadline"], 2), *_bare_cells(st["delivered_s_from_first_deadline"], _get(bare, "storm", "delivered_s"), 2),
        "≤ 3 s", verdict("storm_delivered"),
    ))  # fmt: skip
    lag = exp["lag"]["expiry_lag_ms"]
    rows.append((f"Expiry lag p50/p99/max ms ({exp['lag']['sessions']:,} sessions over {exp['lag']['spread_s']:.0f} s)",
                 f"{_fmt(lag['p50'])} / {_fmt(lag['p99'])} / {_fmt(lag['max'])}", "—", "—", "p99 ≤ 50 ms",
                 verdict("expiry_lag_p99")))  # fmt: skip
    p = results["polling"]
    bl = bare["latency_small"]["latency_ms"]
    for mode, label in (("polling", "GetSession every 1 s"), ("streaming", "WatchSession")):
        st_ms = p[mode]["staleness_ms"]
        c = cpc[mode]
        rows.append((
            f"{p['clients']:,} clients by {label}: staleness p50/p99 ms; server CPU-s/min (learning only)",
            f"{_fmt(st_ms['p50'])} / {_fmt(st_ms['p99'])}; {c['cpu_s_per_minute']:.1f} ({c['learning_cpu_s_per_minute']:.1f})",
            f"{_fmt(bl['p50'], 2)} / {_fmt(bl['p99'], 2)} (stream)" if mode == "streaming"
            else (f"—; {cpc['bare']['polling_cpu_s_per_minute']:.1f} (Echo)" if "bare" in cpc else "—"),
            f"{_fmt(_ratio(st_ms['p99'], bl['p99']))}x (p99)" if mode == "streaming" else "—", "—", "—",
        ))  # fmt: skip
    rows.append((
        "Server CPU per change learned, polling / streaming (learning only, lower bound; with writes)",
        f"≥ {cpc['ratio_learning']:.0f}x; {cpc['ratio_total']:.1f}x",
        *_bare_cells(cpc["ratio_learning"], _get(cpc, "bare", "ratio_learning"), 0, suffix="x"), "≥ 100x", verdict("streaming_vs_polling"),
    ))  # fmt: skip
    if "restart" in results:
        rows.extend(_restart_rows(results, verdict("restart_all_back")))
    rows.append(("Bare echo RPC rate at 64 in flight (/s)", "—", _fmt(echo), "—", "—", "—"))
    header = ("Measurement", "flowsession", "bare grpc.aio", "ours / bare", "Target", "Result")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _bare_cells(ours: float | None, bare: float | None, digits: int, suffix: str = "") -> tuple[str, str]:
    """The bare column and the ours / bare column of a table row; dashes where the run has no bare figure."""
    if bare is None:
        return "—", "—"
    ratio = _ratio(ours, bare)
    return f"{'≥ ' if suffix else ''}{_fmt(bare, digits)}{suffix}", "—" if ratio is None else f"{ratio:.2f}x"


def _restart_rows(results: dict[str, Any], verdict: str) -> list[tuple[str, str, str, str, str, str]]:
    s = results["scale"]
    phase = results["restart"]
    streams = (phase.get("restart") or {}).get("streams") or s["large"]
    label = f"Restart with {streams:,} watchers (SIGTERM, new server on the same port and database)"
    if "error" in phase:
        return [(label, f"phase failed: {phase['error'][:200]}", "—", "—", "all back, 0 CANCELLED", verdict)]
    r, rc = phase["restart"], phase["resume_check"]
    rec = r["reconnect_ms"]
    rows = [
        (
            f"{label}: watchers back; new server listening → all back (s); per-stream reconnect p50/p99 (s)",
            f"{r['back']:,} / {r['streams']:,}; {_fmt(r['all_back_s_after_listening'], 2)}; "
            f"{_fmt((rec['p50'] or 0) / 1000, 2)} / {_fmt((rec['p99'] or 0) / 1000, 2)}",
            "—", "—", "all back, 0 CANCELLED", verdict,
        ),
        (
            "Restart: failed re-opens by status/reason; CANCELLED (stream ends and re-opens)",
            f"{_counts(r['reopen_failures'])}; CANCELLED {r['cancelled']:,}", "—", "—", "—", "—",
        ),
        (
            f"Restart: then one change to each of {rc['changes']:,} sessions: watchers that got exactly the next version",
            f"{rc['exact']:,} / {rc['following']:,} still following"
            + (f" ({rc['changes'] - rc['following']:,} given up)" if rc["following"] != rc["changes"] else "")
            + f"; gaps {rc['gaps']}, dups {rc['dups']}, strays {rc['unchanged_with_events']}",
            "—", "—", "all, no gap/dup", "verified" if rc["all_exact"] else "**gap/dup/missing**",
        ),
    ]  # fmt: skip
    return rows


def markdown(results: dict[str, Any], targets: list[dict[str, Any]]) -> str:
    m = results["machine"]
    missed = [t for t in targets if not t["pass"]]
    head = (
        f"# flowsession benchmark, {results['date']}{' (quick)' if results['scale']['quick'] else ''}\n\n"
        f"{m['nproc']} cores ({m['cpu_model']}), Python {m['python']}, grpcio {m['grpcio']}, SQLite {m['sqlite']}, "
        f"synchronous=FULL on {m['db_filesystem']}; server and clients share the cores. "
        f"Run took {results['duration_s']:.0f} s. Targets met: {len(targets) - len(missed)} of {len(targets)}.\n\n"
    )
    return head + table(results, targets) + "\n"


def chart(results: dict[str, Any], targets: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["scale"]
    by_key = {t["key"]: t for t in targets}
    restart = results.get("restart")
    columns = 5 if restart else 4
    fig, axes = plt.subplots(2, columns, figsize=(4.5 * columns, 8.5))
    ours_c, bare_c, poll_c = "#3b6fb6", "#a0a0a0", "#e08a2c"

    def panel(ax: Any, key: str, title: str, bars: list[tuple[str, float | None, str]], limit: float | None,
              unit: str, log: bool = False, limit_label: str = "target") -> None:  # fmt: skip
        labels = [b[0] for b in bars]
        values = [b[1] or 0.0 for b in bars]
        colors = [b[2] for b in bars]
        ax.bar(labels, values, color=colors)
        for x, v in enumerate(values):
            ax.annotate(_fmt(v, 2), (x, v), ha="center", va="bottom", fontsize=9)
        if limit is not None:
            ax.axhline(limit, color="#c0392b", linestyle="--", linewidth=1.5, label=f"{limit_label} {_fmt(limit, 2)}")
            ax.legend(loc="best", fontsize=8)
        if log:
            ax.set_yscale("log")
        ok = by_key[key]["pass"] if key in by_key else None
        mark = "" if ok is None else ("  [pass]" if ok else "  [MISS]")
        ax.set_title(title + mark, fontsize=10, color="black" if ok in (None, True) else "#c0392b")
        ax.set_ylabel(unit)
        ax.tick_params(axis="x", labelsize=8)

    main, bare, exp, cpc = results["main"], results["bare"], results["expiry"], results["cpu_per_change"]
    for ax, size, key, limit in (
        (axes[0][0], "small", "watch_p99_small", 5.0),
        (axes[0][1], "large", "watch_p99_large", 10.0),
    ):
        o, b = main[f"latency_{size}"]["latency_ms"], bare[f"latency_{size}"]["latency_ms"]
        panel(ax, key, f"watch delivery, {s[size]:,} streams, {s['change_rate']:,.0f}/s",
              [("ours p50", o["p50"], ours_c), ("ours p99", o["p99"], ours_c), ("bare p50", b["p50"], bare_c),
               ("bare p99", b["p99"], bare_c)], limit, "ms (log)", log=True)  # fmt: skip
    panel(axes[0][2], "memory_per_stream", "memory per idle stream",
          [("ours", main["memory"]["per_stream_bytes"] / KB, ours_c), ("bare", bare["memory"]["per_stream_bytes"] / KB, bare_c)],
          50.0, "KB")  # fmt: skip
    echo = bare["echo"]["rate"]
    panel(axes[0][3], "changes_0", f"durable throughput, {s['inflight']} in flight",
          [("created/s\n0 w", main["create_0"]["rate"], ours_c), ("changes/s\n0 w", main["change_0"]["rate"], ours_c),
           (f"created/s\n{s['small']:,} w", main["create_w"]["rate"], ours_c),
           (f"changes/s\n{s['small']:,} w", main["change_w"]["rate"], ours_c),
           ("bare echo", echo, bare_c)], 0.75 * echo, "calls/s", limit_label="0.75 x echo")  # fmt: skip
    st = exp["storm"]
    panel(axes[1][0], "storm_delivered", f"expiry storm, {st['sessions']:,} sessions",
          [("first deadline\n-> all delivered", st["delivered_s_from_first_deadline"], ours_c),
           ("last deadline\n-> all delivered", st["delivered_s_from_last_deadline"], ours_c),
           *([("bare: one push\n-> all delivered", bare["storm"]["delivered_s"], bare_c)] if "storm" in bare else [])],
          3.0, "s")  # fmt: skip
    lag = exp["lag"]["expiry_lag_ms"]
    panel(axes[1][1], "expiry_lag_p99", "expiry lag (spread sessions)",
          [("p50", lag["p50"], ours_c), ("p99", lag["p99"], ours_c), ("max", lag["max"], ours_c)], 50.0, "ms")  # fmt: skip
    p = results["polling"]
    panel(axes[1][2], "", f"staleness, {p['clients']:,} clients",
          [("poll p50", p["polling"]["staleness_ms"]["p50"], poll_c), ("poll p99", p["polling"]["staleness_ms"]["p99"], poll_c),
           ("stream p50", p["streaming"]["staleness_ms"]["p50"], ours_c),
           ("stream p99", p["streaming"]["staleness_ms"]["p99"], ours_c)], None, "ms", log=True)  # fmt: skip
    panel(axes[1][3], "streaming_vs_polling", f"CPU per change learned: ratio ≥ {cpc['ratio_learning']:.0f}x (target ≥ 100x)",
          [("poll\nlearning", cpc["polling"]["learning_cpu_ms_per_change"], poll_c),
           ("stream\nlearning", cpc["streaming"]["learning_cpu_ms_per_change_upper"], ours_c),
           ("poll\ntotal", cpc["polling"]["cpu_ms_per_change"], poll_c),
           ("stream\ntotal", cpc["streaming"]["cpu_ms_per_change"], ours_c),
           *([("bare poll\nlearning", cpc["bare"]["polling_learning_us_per_change"] / 1000, bare_c),
              ("bare stream\nlearning", cpc["bare"]["delivery_us_upper"] / 1000, bare_c)] if "bare" in cpc else [])],
          None, "CPU ms per change", log=True)  # fmt: skip
    if restart:
        r = restart.get("restart")
        if r:
            rec = r["reconnect_ms"]
            ready = r["channels_ready_s_after_listening"]["max"]
            panel(axes[0][4], "restart_all_back", f"restart: {r['back']:,}/{r['streams']:,} watchers back",
                  [("listening ->\nall back", r["all_back_s_after_listening"], ours_c),
                   ("reconnect\np50", (rec["p50"] or 0) / 1000, ours_c), ("reconnect\np99", (rec["p99"] or 0) / 1000, ours_c),
                   ("listening ->\nchannels READY", ready, bare_c)], None, "s")  # fmt: skip
            fails = sorted(((k, v) for k, v in r["reopen_failures"].items() if k != "CANCELLED"), key=lambda kv: -kv[1])[:3]
            bars = [(k.replace("/", "\n"), float(v), ours_c) for k, v in fails]
            bars.append(("CANCELLED\n(all)", float(r["cancelled"]), "#c0392b"))
            bars.append(("watchers\nnot back", float(r["streams"] - r["back"]), "#c0392b"))
            panel(axes[1][4], "", "restart: failed re-opens by status", bars, None, "count")
            axes[1][4].set_ylim(bottom=0, top=max(1.0, 1.15 * max(b[1] for b in bars)))
        else:
            axes[0][4].set_title("restart: phase failed  [MISS]", fontsize=10, color="#c0392b")
            axes[0][4].text(0.02, 0.5, restart.get("error", "")[:300], wrap=True, fontsize=8, transform=axes[0][4].transAxes)
            axes[1][4].axis("off")
    m = results["machine"]
    fig.suptitle(
        f"flowsession bench {results['date']}{' (quick)' if s['quick'] else ''} — {m['nproc']} cores, Python {m['python']}, "
        f"grpcio {m['grpcio']}; red dashed line = target; blue = flowsession, grey = bare grpc.aio, orange = 1 s polling",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
