"""`flowsession serve` flags and FLOWSESSION_* variables fill Settings; bad values stop the start."""
from __future__ import annotations

from datetime import timedelta

import pytest

from flowsession_server import cli


def parse(monkeypatch, argv, **env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return cli.settings_from(cli._parser().parse_args(["serve", *argv]))


def test_flags_fill_settings(monkeypatch):
    s = parse(
        monkeypatch,
        ["--db", "x.db", "--environments", "live, eu", "--watch-heartbeat", "5", "--event-retention", "60",
         "--max-watchers", "7", "--watch-queue", "3", "--feed-poll", "0.05", "--synchronous", "NORMAL"],
    )
    assert (s.db_path, s.environments, s.watch_heartbeat, s.max_watchers, s.watch_queue, s.feed_poll, s.synchronous) == (
        "x.db", frozenset({"live", "eu"}), 5.0, 7, 3, 0.05, "NORMAL"
    )
    assert s.event_retention == timedelta(seconds=60)


def test_tuning_flags_fill_settings(monkeypatch):
    s = parse(monkeypatch, ["--max-opening-watchers", "16", "--read-threads", "2", "--shutdown-grace", "0.5", "--shutdown-drain", "0.05"])
    assert (s.max_opening_watchers, s.read_threads, s.shutdown_grace, s.shutdown_drain) == (16, 2, 0.5, 0.05)
    s = parse(monkeypatch, [], FLOWSESSION_READ_THREADS="8", FLOWSESSION_SHUTDOWN_GRACE="3")
    assert (s.read_threads, s.shutdown_grace, s.max_opening_watchers) == (8, 3.0, 256)


def test_environment_variables_are_the_defaults_and_flags_win(monkeypatch):
    s = parse(monkeypatch, ["--max-watchers", "9"], FLOWSESSION_DB="env.db", FLOWSESSION_MAX_WATCHERS="5")
    assert (s.db_path, s.max_watchers) == ("env.db", 9)


def test_a_flag_overrides_a_bad_variable(monkeypatch):
    assert parse(monkeypatch, ["--watch-queue", "5"], FLOWSESSION_WATCH_QUEUE="abc").watch_queue == 5
    with pytest.raises(SystemExit, match=r"--watch-queue \(from FLOWSESSION_WATCH_QUEUE\) must be an integer, not 'abc'"):
        parse(monkeypatch, [], FLOWSESSION_WATCH_QUEUE="abc")
    with pytest.raises(SystemExit, match=r"--watch-queue \(from FLOWSESSION_WATCH_QUEUE\) must be from 1 to"):
        parse(monkeypatch, [], FLOWSESSION_WATCH_QUEUE="0")


@pytest.mark.parametrize(
    "argv, env",
    [
        ([], {"FLOWSESSION_SYNCHRONOUS": "bogus"}),  # would silently weaken durability
        (["--watch-queue", "0"], {}),
        (["--max-watchers", "0"], {}),
        (["--environments", " , "], {}),
        (["--event-retention", "0"], {}),
        (["--read-threads", "0"], {}),
        (["--max-opening-watchers", "0"], {}),
        (["--shutdown-grace", "-1"], {}),
        ([], {"FLOWSESSION_MAX_WATCHERS": "lots"}),  # a clear message, not a traceback
        (["--watch-heartbeat", "nan"], {}),  # NaN passed every "at least" check
        (["--feed-poll", "inf"], {}),
        (["--event-retention", "1e15"], {}),  # beyond what a datetime can subtract: a traceback once
        (["--event-retention", "inf"], {}),
        (["--log-level", "bogus"], {}),
        ([], {"FLOWSESSION_LOG_LEVEL": "loud"}),
    ],
)
def test_bad_values_refuse_to_start(monkeypatch, argv, env):
    with pytest.raises(SystemExit):
        parse(monkeypatch, argv, **env)


def test_values_on_the_limits_are_accepted(monkeypatch):
    argv = ["--watch-queue", "1000000", "--event-retention", str(3650 * 86400), "--feed-poll", "0.001",
            "--shutdown-grace", "0", "--read-threads", "64", "--log-level", "warn", "--environments", "e" * 64]  # fmt: skip
    settings = parse(monkeypatch, argv)
    assert settings.watch_queue == 1_000_000 and settings.event_retention.days == 3650
    assert settings.environments == frozenset({"e" * 64})
