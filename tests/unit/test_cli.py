"""`flowsession serve` flags and FLOWSESSION_* variables fill Settings; bad values stop the start."""
from __future__ import annotations

import contextlib
import sqlite3
from datetime import timedelta

import pytest

from flowsession_server import cli
from flowsession_server.store import schema


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


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("FLOWSESSION_LOG_LEVEL", "bogus", r"--log-level \(from FLOWSESSION_LOG_LEVEL\) must be one of .*, not 'bogus'"),
        ("FLOWSESSION_SYNCHRONOUS", "OFF", r"--synchronous \(from FLOWSESSION_SYNCHRONOUS\) must be FULL or NORMAL, not 'OFF'"),
        ("FLOWSESSION_ENVIRONMENTS", ",", r"--environments \(from FLOWSESSION_ENVIRONMENTS\) needs at least one name"),
    ],
)
def test_a_bad_text_variable_is_named_in_the_message(monkeypatch, variable, value, message):
    """Only the numeric flags named the variable: one who never passed the flag was pointed at it."""
    with pytest.raises(SystemExit, match=message):
        parse(monkeypatch, [], **{variable: value})


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



def start(capsys, db) -> tuple[int, str]:
    """`flowsession serve` on ``db`` that is expected to stop at once: its exit code and stderr."""
    code = cli.main(["serve", "--address", "127.0.0.1:0", "--db", str(db), "--log-level", "CRITICAL"])
    return code, capsys.readouterr().err


def test_a_database_that_cannot_be_opened_stops_the_start_with_a_message(tmp_path, capsys):
    # Each ended in a traceback of sqlite3's exception.
    (tmp_path / "garbage.db").write_bytes(b"not sqlite at all " * 1000)
    (tmp_path / "folder.db").mkdir()
    for db, why in [
        (tmp_path / "missing" / "x.db", f"its directory {tmp_path / 'missing'} does not exist"),
        (tmp_path / "garbage.db", "file is not a database"),
        (tmp_path / "folder.db", "it is a directory"),
    ]:
        assert start(capsys, db) == (1, f"flowsession: cannot use the database {db}: {why}\n")


def test_a_database_this_release_must_not_run_on_stops_the_start_with_a_message(tmp_path, capsys, monkeypatch):
    def refused(conn):
        raise schema.SchemaError("it was migrated by a newer release of flowsession (m999_later); run that release")

    monkeypatch.setattr(schema, "migrate", refused)
    db = tmp_path / "x.db"
    assert start(capsys, db) == (
        1, f"flowsession: cannot use the database {db}: it was migrated by a newer release of flowsession (m999_later); run that release\n"
    )


def test_a_database_a_newer_release_migrated_is_refused(tmp_path):
    """An older release started on it as if its schema were its own."""
    db = str(tmp_path / "x.db")
    with contextlib.closing(schema.connect(db)) as conn:
        schema.migrate(conn)
        conn.execute(
            "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) VALUES ('flowsession', 'm999_later', '')"
        )
        with pytest.raises(schema.SchemaError, match=r"migrated by a newer release of flowsession \(m999_later\)"):
            schema.migrate(conn)
        assert not conn.in_transaction


def test_another_application_s_database_is_refused_and_left_alone(tmp_path):
    """A mistyped --db: the server added its tables to the file and started on it."""
    db = str(tmp_path / "theirs.db")
    with contextlib.closing(schema.connect(db)) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
        with pytest.raises(schema.SchemaError, match=r"not a flowsession database \(it holds tables customers\)"):
            schema.migrate(conn)
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["customers"]


def test_migrating_a_database_it_cannot_write_fails(tmp_path):
    """A read-only file (its mode, a read-only mount) opens without a word; the server then started,
    SERVING, and refused every write with a retryable STORE_UNAVAILABLE."""
    db = str(tmp_path / "x.db")
    with contextlib.closing(schema.connect(db)) as conn:
        schema.migrate(conn)
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)) as readonly:
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                schema.migrate(readonly)
            assert not readonly.in_transaction


def test_an_address_that_cannot_be_bound_stops_the_start_with_a_message(tmp_path, capsys):
    db = tmp_path / "x.db"
    code = cli.main(["serve", "--address", "192.0.2.1:50999", "--db", str(db), "--log-level", "CRITICAL"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("flowsession: cannot listen on 192.0.2.1:50999: Failed to bind"), err
