"""Read queries. Plain functions over a connection: the writer's commands use them inside its
transaction, and ``Reader`` runs them on its own pooled WAL connections, off the event loop."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, TypeVar

from ..domain.model import START, Flow, FlowVersion, LogPosition, Session, SessionEvent, SessionStatus
from ..domain.errors import Unavailable
from . import codec, schema

log = logging.getLogger(__name__)
T = TypeVar("T")

EVENT_PAGE = 1000
_EVENT_COLUMNS = "e.cursor, e.session_id, e.version, e.type, e.event_us, e.body, s.input"


@contextlib.contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """One read transaction around a read of several statements (a flow row and its publications), so
    they all see the same commit: each statement on its own would see the commits made between them,
    and answer a DRAFT published somewhere, two versions published to one environment, or a published
    version above latest_version. Inside a transaction already (the writer's commands), that one."""
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    finally:
        if conn.in_transaction:  # SQLite may have rolled back already after an I/O error
            conn.execute("ROLLBACK")


def get_flow(conn: sqlite3.Connection, flow_id: str) -> Flow | None:
    with _snapshot(conn):
        row = conn.execute("SELECT * FROM flows WHERE flow_id = ?", [flow_id]).fetchone()
        if row is None:
            return None
        return codec.flow_from_row(row, _publications(conn, flow_id))


def _publications(conn: sqlite3.Connection, flow_id: str) -> dict[str, int]:
    rows = conn.execute("SELECT environment, version FROM publications WHERE flow_id = ?", [flow_id])
    return {r["environment"]: r["version"] for r in rows}


def list_flows(conn: sqlite3.Connection, after: list[Any] | None, limit: int) -> list[Flow]:
    with _snapshot(conn):
        if after is None:
            rows = conn.execute("SELECT * FROM flows ORDER BY create_us, flow_id LIMIT ?", [limit]).fetchall()
        else:
            rows = conn.execute(
                "SELECT * FROM flows WHERE (create_us, flow_id) > (?, ?) ORDER BY create_us, flow_id LIMIT ?",
                [after[0], after[1], limit],
            ).fetchall()
        return [codec.flow_from_row(r, _publications(conn, r["flow_id"])) for r in rows]


def get_flow_version(conn: sqlite3.Connection, flow_id: str, version: int) -> FlowVersion | None:
    with _snapshot(conn):
        row = conn.execute("SELECT * FROM flow_versions WHERE flow_id = ? AND version = ?", [flow_id, version]).fetchone()
        if row is None:
            return None
        return codec.flow_version_from_row(row, _environments_of(conn, flow_id, version))


def _environments_of(conn: sqlite3.Connection, flow_id: str, version: int) -> tuple[str, ...]:
    rows = conn.execute(
        "SELECT environment FROM publications WHERE flow_id = ? AND version = ? ORDER BY environment", [flow_id, version]
    )
    return tuple(r["environment"] for r in rows)


def list_flow_versions(conn: sqlite3.Connection, flow_id: str, after_version: int, limit: int) -> list[FlowVersion]:
    with _snapshot(conn):
        rows = conn.execute(
            "SELECT * FROM flow_versions WHERE flow_id = ? AND version > ? ORDER BY version LIMIT ?",
            [flow_id, after_version, limit],
        ).fetchall()
        return [codec.flow_version_from_row(r, _environments_of(conn, flow_id, r["version"])) for r in rows]


def get_session(conn: sqlite3.Connection, session_id: str) -> Session | None:
    row = conn.execute("SELECT session_id, input, body FROM sessions WHERE session_id = ?", [session_id]).fetchone()
    if row is None:
        return None
    return codec.session_from_body(row["session_id"], row["body"], row["input"])


def list_sessions(
    conn: sqlite3.Connection,
    environment: str,
    flow_id: str,
    statuses: Iterable[SessionStatus],
    after: list[Any] | None,
    limit: int,
) -> list[Session]:
    where = ["environment = ?"]
    args: list[Any] = [environment]
    if flow_id:
        where.append("flow_id = ?")
        args.append(flow_id)
    status_values = sorted({s.value for s in statuses})
    if status_values:
        where.append(f"status IN ({','.join('?' * len(status_values))})")
        args.extend(status_values)
    if after is not None:
        where.append("(create_us, session_id) < (?, ?)")
        args.extend(after)
    rows = conn.execute(
        f"SELECT session_id, input, body FROM sessions WHERE {' AND '.join(where)} "
        "ORDER BY create_us DESC, session_id DESC LIMIT ?",
        [*args, limit],
    ).fetchall()
    return [codec.session_from_body(r["session_id"], r["body"], r["input"]) for r in rows]


def events_after(conn: sqlite3.Connection, session_id: str, after_version: int, limit: int = EVENT_PAGE) -> list[SessionEvent]:
    rows = conn.execute(
        f"SELECT {_EVENT_COLUMNS} FROM events e JOIN sessions s ON s.session_id = e.session_id "
        "WHERE e.session_id = ? AND e.version > ? ORDER BY e.version LIMIT ?",
        [session_id, after_version, limit],
    ).fetchall()
    return [codec.event_from_row(r) for r in rows]


def log_after(conn: sqlite3.Connection, after_cursor: int, limit: int) -> tuple[LogPosition, list[SessionEvent]]:
    """In one snapshot: the oldest resumable position (see oldest_position), and the log after a cursor.
    Past that cursor, the oldest position says that retention deleted events of the range before they
    were read."""
    with _snapshot(conn):
        rows = conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events e JOIN sessions s ON s.session_id = e.session_id "
            "WHERE e.cursor > ? ORDER BY e.cursor LIMIT ?",
            [after_cursor, limit],
        ).fetchall()
        return oldest_position(conn), [codec.event_from_row(r) for r in rows]


def _environment_filter(environment: str, flow_id: str, statuses: Iterable[SessionStatus], column: str) -> tuple[str, list[Any]]:
    where = [f"{column}.environment = ?"]
    args: list[Any] = [environment]
    if flow_id:
        where.append(f"{column}.flow_id = ?")
        args.append(flow_id)
    values = sorted({s.value for s in statuses})
    if values:
        where.append(f"{column}.status IN ({','.join('?' * len(values))})")
        args.extend(values)
    return " AND ".join(where), args


def environment_events(
    conn: sqlite3.Connection,
    environment: str,
    flow_id: str,
    statuses: Iterable[SessionStatus],
    after_cursor: int,
    limit: int,
) -> list[SessionEvent]:
    """The log of one environment after a cursor, filtered like WatchSessions (status after the event)."""
    where, args = _environment_filter(environment, flow_id, statuses, "e")
    rows = conn.execute(
        f"SELECT {_EVENT_COLUMNS} FROM events e JOIN sessions s ON s.session_id = e.session_id "
        f"WHERE {where} AND e.cursor > ? ORDER BY e.cursor LIMIT ?",
        [*args, after_cursor, limit],
    ).fetchall()
    return [codec.event_from_row(r) for r in rows]


def current_events(
    conn: sqlite3.Connection, environment: str, flow_id: str, after_cursor: int, up_to_cursor: int, limit: int
) -> list[SessionEvent]:
    """The latest event of each RUNNING session whose latest cursor is in (after_cursor, up_to_cursor]."""
    where, args = _environment_filter(environment, flow_id, (SessionStatus.RUNNING,), "s")
    rows = conn.execute(
        f"SELECT {_EVENT_COLUMNS} FROM sessions s JOIN events e ON e.session_id = s.session_id AND e.version = s.version "
        f"WHERE {where} AND e.cursor > ? AND e.cursor <= ? ORDER BY e.cursor LIMIT ?",
        [*args, after_cursor, up_to_cursor, limit],
    ).fetchall()
    return [codec.event_from_row(r) for r in rows]


def max_cursor(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT MAX(cursor) AS c FROM events").fetchone()
    return row["c"] or 0


def pruned_through(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT value FROM meta WHERE key = 'pruned_through'").fetchone()["value"])


def head(conn: sqlite3.Connection) -> LogPosition:
    """The position after the log's newest event."""
    row = conn.execute("SELECT cursor, session_id, version, event_us FROM events ORDER BY cursor DESC LIMIT 1").fetchone()
    return START if row is None else _position(row)


def oldest_position(conn: sqlite3.Connection) -> LogPosition:
    """The oldest position a watch may resume from: after the newest pruned event (its tag is kept
    with it; empty if pruned before tags were kept)."""
    cursor = pruned_through(conn)
    if cursor == 0:
        return START
    row = conn.execute("SELECT value FROM meta WHERE key = 'pruned_tag'").fetchone()
    return LogPosition(cursor, "" if row is None else row["value"])


def log_bounds(conn: sqlite3.Connection, cursor: int) -> tuple[LogPosition, LogPosition, LogPosition | None]:
    """In one snapshot: the oldest resumable position, the head, and the position of the event at
    ``cursor`` if the log holds it."""
    conn.execute("BEGIN")  # one read transaction: retention or a writer cannot slip between the three
    try:
        row = conn.execute("SELECT cursor, session_id, version, event_us FROM events WHERE cursor = ?", [cursor]).fetchone()
        return oldest_position(conn), head(conn), None if row is None else _position(row)
    finally:
        if conn.in_transaction:  # SQLite may have rolled back already after an I/O error
            conn.execute("ROLLBACK")


def _position(row: Any) -> LogPosition:
    return LogPosition(row["cursor"], codec.event_tag(row["session_id"], row["version"], row["event_us"]))


def next_expiry_us(conn: sqlite3.Connection) -> int | None:
    row = conn.execute("SELECT MIN(expire_us) AS due FROM sessions WHERE status = 'RUNNING'").fetchone()
    return row["due"]


def due_sessions(conn: sqlite3.Connection, now_us: int, limit: int) -> list[Session]:
    rows = conn.execute(
        "SELECT session_id, input, body FROM sessions WHERE status = 'RUNNING' AND expire_us <= ? "
        "ORDER BY expire_us LIMIT ?",
        [now_us, limit],
    )
    return [codec.session_from_body(r["session_id"], r["body"], r["input"]) for r in rows]


class Reader:
    """Runs read functions on a small thread pool, one WAL connection per thread."""

    def __init__(self, path: str, *, threads: int = 4):
        self._path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="flowsession-read")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = schema.connect(self._path, create=False)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn`` on a reader thread. A failing read (I/O error, a corrupt page) is UNAVAILABLE, like a
        failing commit: a caller can retry, and the background loops carry on instead of dying."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, lambda: fn(self._conn(), *args))
        except sqlite3.Error as exc:
            log.warning("read %s failed: %s", getattr(fn, "__name__", fn), exc)
            raise Unavailable(f"the store could not be read: {exc}", reason="STORE_UNAVAILABLE", retry_after=1.0) from exc

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
