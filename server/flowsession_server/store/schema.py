"""Schema (sqlite-utils migrations) and connection settings.

Every connection: WAL (readers never block the writer), synchronous FULL by default (an answered
write survives a power cut), and a busy timeout so a second process waits for the lock instead of failing.
"""
from __future__ import annotations

import secrets
import sqlite3
import urllib.parse

import sqlite_utils
import tenacity
from sqlite_utils.migrations import Migrations

migrations = Migrations("flowsession")
KNOWN: list[str] = []  # this release's migrations, in order


class SchemaError(Exception):
    """This release cannot use the database file; the start stops with the message."""


def _migration(fn):  # type: ignore[no-untyped-def]
    KNOWN.append(fn.__name__)
    return migrations()(fn)


@_migration
def m001_initial(db: sqlite_utils.Database) -> None:
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute(
        """CREATE TABLE flows (
            flow_id TEXT PRIMARY KEY, name TEXT NOT NULL, description TEXT NOT NULL,
            create_us INTEGER NOT NULL, update_us INTEGER NOT NULL, latest_version INTEGER NOT NULL)"""
    )
    db.execute("CREATE INDEX flows_by_create ON flows (create_us, flow_id)")
    db.execute(
        """CREATE TABLE flow_versions (
            flow_id TEXT NOT NULL REFERENCES flows(flow_id), version INTEGER NOT NULL,
            state TEXT NOT NULL, graph TEXT NOT NULL, timeout_us INTEGER NOT NULL,
            create_us INTEGER NOT NULL, update_us INTEGER NOT NULL, publish_us INTEGER,
            PRIMARY KEY (flow_id, version))"""
    )
    db.execute(
        """CREATE TABLE publications (
            flow_id TEXT NOT NULL, environment TEXT NOT NULL, version INTEGER NOT NULL, publish_us INTEGER NOT NULL,
            PRIMARY KEY (flow_id, environment), FOREIGN KEY (flow_id, version) REFERENCES flow_versions(flow_id, version))"""
    )
    db.execute(
        """CREATE TABLE sessions (
            session_id TEXT PRIMARY KEY, environment TEXT NOT NULL, flow_id TEXT NOT NULL,
            status TEXT NOT NULL, create_us INTEGER NOT NULL, expire_us INTEGER NOT NULL,
            version INTEGER NOT NULL, input TEXT NOT NULL, body TEXT NOT NULL)"""
    )
    db.execute("CREATE INDEX sessions_by_env ON sessions (environment, create_us DESC, session_id DESC)")
    db.execute("CREATE INDEX sessions_by_flow ON sessions (environment, flow_id, create_us DESC, session_id DESC)")
    db.execute("CREATE INDEX sessions_running ON sessions (expire_us) WHERE status = 'RUNNING'")
    db.execute(
        """CREATE TABLE events (
            cursor INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL, version INTEGER NOT NULL,
            type TEXT NOT NULL, event_us INTEGER NOT NULL, environment TEXT NOT NULL, flow_id TEXT NOT NULL,
            status TEXT NOT NULL, body TEXT NOT NULL, UNIQUE (session_id, version))"""
    )
    db.execute("CREATE INDEX events_by_env ON events (environment, cursor)")
    db.execute("CREATE INDEX events_by_time ON events (event_us)")
    # Idempotency keys: scope is "create:<environment>" or "report:<session_id>".
    db.execute(
        """CREATE TABLE request_ids (
            scope TEXT NOT NULL, request_id TEXT NOT NULL, fingerprint TEXT NOT NULL,
            session_id TEXT NOT NULL, response TEXT NOT NULL, create_us INTEGER NOT NULL,
            PRIMARY KEY (scope, request_id))"""
    )
    db.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?)", [secrets.token_hex(8)])
    db.execute("INSERT INTO meta (key, value) VALUES ('token_key', ?)", [secrets.token_hex(32)])
    db.execute("INSERT INTO meta (key, value) VALUES ('page_key', ?)", [secrets.token_hex(32)])
    # Highest cursor removed by retention: resuming from below it would skip events.
    db.execute("INSERT INTO meta (key, value) VALUES ('pruned_through', '0')")


@_migration
def m002_retention_floor(db: sqlite_utils.Database) -> None:
    # Retention reads events from a floor up (see commands.prune_events), and finds the floor with the
    # oldest RUNNING session; idempotency keys are pruned by age.
    db.execute("CREATE INDEX sessions_running_since ON sessions (create_us) WHERE status = 'RUNNING'")
    db.execute("CREATE INDEX request_ids_by_time ON request_ids (create_us)")
    db.execute("INSERT INTO meta (key, value) VALUES ('prune_floor_us', '0')")


def _locked(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


# Switching a new file to WAL needs an exclusive lock and SQLite reports a competing opener as "locked"
# at once instead of calling the busy handler, so processes starting together retry it briefly.
@tenacity.retry(
    retry=tenacity.retry_if_exception(_locked),
    wait=tenacity.wait_random_exponential(multiplier=0.01, max=0.5),
    stop=tenacity.stop_after_delay(30),
    reraise=True,
)
def _use_wal(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")


def connect(path: str, *, synchronous: str = "FULL", create: bool = True) -> sqlite3.Connection:
    """``create=False`` for connections opened once the database exists (readers): a file gone from the
    path must fail them, not be replaced by a new, empty database."""
    target = path if create else f"file:{urllib.parse.quote(path)}?mode=rw"
    conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False, timeout=30.0, uri=not create)
    conn.row_factory = sqlite3.Row
    _use_wal(conn)
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def migrate(conn: sqlite3.Connection) -> None:
    """Applies pending migrations under one write lock, so processes starting together on one file
    take turns: the first migrates, the others then find nothing pending. Refuses (SchemaError) a file
    a newer release has migrated, or one holding another application's tables; and fails on a file it
    cannot write, which SQLite opens read-only without a word."""
    db = sqlite_utils.Database(conn)
    conn.execute("BEGIN IMMEDIATE")
    try:
        applied = [m.name for m in migrations.applied(db)]
        newer = [name for name in applied if name not in KNOWN]
        if newer:
            raise SchemaError(
                f"it was migrated by a newer release of flowsession ({', '.join(newer)}); run that release"
            )
        if not applied:
            tables = [
                r[0] for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
                    "AND name != ?", [migrations.migrations_table],
                )
            ]
            if tables:
                raise SchemaError(f"it is not a flowsession database (it holds tables {', '.join(sorted(tables)[:5])})")
        migrations.apply(db)  # nested in our transaction: sqlite-utils uses savepoints
        # A write, undone: a read-only file fails it here instead of every write once serving.
        conn.execute("SAVEPOINT writable")
        conn.execute("INSERT INTO meta (key, value) VALUES ('writable', '')")
        conn.execute("ROLLBACK TO writable")
        conn.execute("RELEASE writable")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def read_meta(conn: sqlite3.Connection) -> dict[str, str]:
    return {row["key"]: row["value"] for row in conn.execute("SELECT key, value FROM meta")}
