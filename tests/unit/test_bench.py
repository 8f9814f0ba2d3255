"""The bench's own logic (bench/): the servers run with the flags the results name, the idle window holds
the heartbeats, a figure over part of the events cannot pass, notes state what the readings show, and
the bare ceiling's process is tuned like flowsession's."""
from __future__ import annotations

import inspect
from pathlib import Path

from bench import bare_server, procs, report, run
from flowsession_server import cli
from flowsession_server.config import Settings


def test_child_env_drops_flowsession_variables(monkeypatch):
    monkeypatch.setenv("FLOWSESSION_SYNCHRONOUS", "NORMAL")
    monkeypatch.setenv("FLOWSESSION_WATCH_HEARTBEAT", "1")
    env = procs.child_env()
    assert not [k for k in env if k.startswith("FLOWSESSION_")]
    assert {"FLOWSESSION_SYNCHRONOUS", "FLOWSESSION_WATCH_HEARTBEAT"} <= set(procs.ignored_server_env())


def test_bench_server_argv_is_synchronous_full_even_with_normal_in_the_environment(monkeypatch):
    monkeypatch.setenv("FLOWSESSION_SYNCHRONOUS", "NORMAL")
    argv = procs.flowsession_argv(Path("/tmp/x.db"), Path("/tmp/x.gc.jsonl"), "127.0.0.1:0")
    serve = argv[argv.index("serve"):]
    assert cli.settings_from(cli._parser().parse_args(serve)).synchronous == "FULL"


def test_full_run_idle_window_lasts_one_heartbeat_interval():
    assert run.Scale.full().idle_window >= Settings.watch_heartbeat


def test_a_window_right_after_the_opens_holds_the_heartbeats_only_when_as_long_as_their_interval():
    assert run.covers_heartbeat(30.0, 10.0, 30.0)
    assert not run.covers_heartbeat(10.0, 10.0, 30.0)  # the old 10 s window: every heartbeat falls after it
    assert not run.covers_heartbeat(30.0, 31.0, 30.0)  # the first streams' heartbeats came before it started


def test_idle_ratio_to_a_reading_of_a_few_ticks_is_a_lower_bound():
    assert report.idle_ratio(0.20, 0.01) == "≥ 10x"  # one tick: 0.00-0.02 s
    assert report.idle_ratio(2.0, 0.5) == "4.0x"


def test_undelivered_counts_what_the_run_made_but_never_received():
    assert report.undelivered({"all_delivered": True, "expected": 10, "delivered": 10}) == 0
    assert report.undelivered({"all_delivered": False, "expected": 10_000, "delivered": 9_400}) == 600
    assert report.undelivered({"all_delivered": False, "sessions": 10_000, "expired_delivered": 9_999}) == 1
    assert report.undelivered(None) == 0


def test_a_p99_over_the_events_that_arrived_fails_when_some_did_not():
    ok = report._target("watch_p99_small", "p99", 1.0, "ms", "<=", 5.0)
    partial = report._target("watch_p99_small", "p99", 1.0, "ms", "<=", 5.0, missing=600)
    assert ok["pass"] and not partial["pass"]
    assert partial["undelivered"] == 600


def test_queueing_on_a_full_core_is_claimed_only_when_the_server_used_one():
    full = report.load_fact({"server_cpu_pct_of_core": 95.0, "machine_busy_pct": 99.0}, 1000.0)
    idle_server_busy_machine = report.load_fact({"server_cpu_pct_of_core": 21.0, "machine_busy_pct": 95.0}, 100.0)
    neither = report.load_fact({"server_cpu_pct_of_core": 21.0, "machine_busy_pct": 40.0}, 100.0)
    assert "95% of the one core" in full and "queue" in full
    assert "queue" not in idle_server_busy_machine and "waited for a core" in idle_server_busy_machine
    assert "not CPU-bound" in neither


def test_bare_server_tunes_the_garbage_collector_as_flowsession_serve_does():
    assert bare_server.tune_gc is cli.tune_gc
    assert "tune_gc()" in inspect.getsource(bare_server.serve)
