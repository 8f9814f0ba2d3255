"""The SQLite store (store/store.py) with a FakeClock, on a tmp_path database per test.

Each test body is a coroutine run with asyncio.run(); every store is closed in a ``finally``.
Where a test needs several commands in one group-commit batch it holds SQLite's write lock from a
separate connection while the commands are queued (``gathered_in_one_go``), so batching does not
depend on thread timing.
"""
from __future__ import annotations

import asyncio
import os
import contextlib
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils
from flowsession_server.clock import FakeClock
from flowsession_server.domain import lifecycle
from flowsession_server.domain.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    Unavailable,
    VersionMismatch,
)
from flowsession_server.domain.model import (
    EventType,
    Flow,
    FlowGraph,
    FlowVersionState,
    Session,
    SessionEvent,
    SessionOutcome,
    SessionStatus,
    Step,
)
from flowsession_server.store import codec, commands, reads, schema, writer
from flowsession_server.store.commands import IdempotencyKey, NewSession, Verb
from flowsession_server.retention import Retention
from flowsession_server.store.store import Store

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TIMEOUT = timedelta(hours=1)
US = timedelta(microseconds=1)
ENV = "live"
DEADLINE_S = 10.0  # a broken writer fails the test in this long instead of hanging it

# "check" may be retried any number of times (a self-loop), so one session can take many changes.
GRAPH = FlowGraph(
    "check",
    (
        Step("check", "document_check", {"retry": "check", "ok": "accepted", "bad": "rejected"}),
        Step("accepted", "end", outcome=SessionOutcome.ACCEPTED),
        Step("rejected", "end", outcome=SessionOutcome.REJECTED),
    ),
)


class Recorder:
    """on_commit / on_health callbacks: what they got, and on which thread."""

    def __init__(self) -> None:
        self.calls: list[list[SessionEvent]] = []
        self.health: list[bool] = []
        self.threads: set[int] = set()

    def on_commit(self, events: list[SessionEvent]) -> None:
        self.threads.add(threading.get_ident())
        self.calls.append(list(events))

    def on_health(self, healthy: bool) -> None:
        self.health.append(healthy)

    @property
    def events(self) -> list[SessionEvent]:
        return [e for call in self.calls for e in call]


def db(tmp_path: Path) -> str:
    return str(tmp_path / "flowsession.db")


async def with_store(
    path: str, clock: FakeClock, body: Callable[[Store, Recorder], Awaitable[Any]], recorder: Recorder | None = None
) -> Any:
    recorder = recorder or Recorder()
    store = Store(path, clock)
    try:
        await store.open(recorder.on_commit, recorder.on_health)
        return await asyncio.wait_for(body(store, recorder), DEADLINE_S)
    finally:
        await store.close()


def run(tmp_path: Path, body: Callable[[Store, Recorder], Awaitable[Any]], clock: FakeClock | None = None) -> Any:
    return asyncio.run(with_store(db(tmp_path), clock or FakeClock(T0), body))


async def published_flow(store: Store, timeout: timedelta = TIMEOUT, environment: str = ENV) -> Flow:
    flow = await store.create_flow("kyc", "identity check")
    await store.create_flow_version(flow.flow_id, GRAPH, timeout)
    _, flow = await store.publish_flow_version(flow.flow_id, 1, environment)
    return flow


def new_session(flow_id: str, session_id: str, environment: str = ENV) -> NewSession:
    return NewSession(
        session_id=session_id,
        flow_id=flow_id,
        environment=environment,
        input={"country": "FR", "n": 1},
        metadata={"customer": session_id},
        redirect_url="https://example.com/done",
        state="st",
    )


async def create(store: Store, flow_id: str, session_id: str, key: IdempotencyKey | None = None) -> Session:
    session, replayed = await store.create_session(new_session(flow_id, session_id), key)
    assert not replayed
    return session


def report(step_id: str, verdict: str, expected_version: int = 0) -> Verb:
    return lambda s, fv, now: lifecycle.report_step(
        s, fv, step_id=step_id, verdict=verdict, now=now, expected_version=expected_version
    )


def abort(reason: str = "user left") -> Verb:
    return lambda s, _fv, now: lifecycle.abort(s, reason=reason, now=now)


@contextlib.contextmanager
def write_lock_held(path: str) -> Iterator[None]:
    """Another connection (as another process would) holds the write lock inside the block."""
    gate = sqlite3.connect(path, isolation_level=None)
    try:
        gate.execute("BEGIN IMMEDIATE")
        yield
        gate.execute("ROLLBACK")
    finally:
        gate.close()


async def gathered_in_one_go(store: Store, *calls: Awaitable[Any], writes: int | None = None) -> list[Any]:
    """Runs ``calls`` concurrently while another connection holds the write lock, so every command
    is queued before the writer can commit any: they land in at most two batches (the writer may
    already hold the first one while it waits for the lock). ``writes``: how many of the calls submit
    a command at once (all by default; more may follow). Results and exceptions, in call order."""
    with write_lock_held(store.path):
        gathered = asyncio.gather(*calls, return_exceptions=True)
        await until(lambda: store.queued_writes >= (len(calls) if writes is None else writes))
    return await gathered


async def until(condition: Callable[[], bool]) -> None:
    """Waits on the event loop, with a deadline, for state no future reports."""
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def batches_since(recorder: Recorder, start: int) -> list[list[SessionEvent]]:
    return recorder.calls[start:]


# Schema and migrations


def tables(path: str) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    try:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        migrations = conn.execute("SELECT migration_set, name FROM _sqlite_migrations ORDER BY id").fetchall()
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        conn.close()
    return {"names": names, "migrations": migrations, "meta": meta, "journal": journal}


def pending_migrations(path: str) -> list[Any]:
    conn = sqlite3.connect(path)
    try:
        return schema.migrations.pending(sqlite_utils.Database(conn))
    finally:
        conn.close()


def test_migrations_create_schema_once_and_reopen_cleanly(tmp_path: Path) -> None:
    path = db(tmp_path)

    async def keys(store: Store, _rec: Recorder) -> Any:
        assert store.writable
        return store.keys

    first = asyncio.run(with_store(path, FakeClock(T0), keys))
    after_first = tables(path)
    assert {"meta", "flows", "flow_versions", "publications", "sessions", "events", "request_ids"} <= after_first["names"]
    applied = after_first["migrations"]
    assert ("flowsession", "m001_initial") in applied
    assert len(applied) == len(set(applied))  # each migration recorded once
    assert not pending_migrations(path)
    assert {"epoch", "token_key", "page_key"} <= set(after_first["meta"])
    assert after_first["journal"] == "wal"
    assert len(first.epoch) == 16
    assert len(first.token_key) == 32 and len(first.page_key) == 32
    assert first.token_key != first.page_key

    for _ in range(2):
        again = asyncio.run(with_store(path, FakeClock(T0), keys))
        assert again == first  # epoch and keys persist
        assert tables(path) == after_first  # nothing re-applied, nothing added

    other = asyncio.run(with_store(str(tmp_path / "other.db"), FakeClock(T0), keys))
    assert other.epoch != first.epoch and other.token_key != first.token_key


# Flows, versions, sessions


def test_flow_version_publish_session_round_trip(tmp_path: Path) -> None:
    clock = FakeClock(T0)

    async def body(store: Store, rec: Recorder) -> None:
        flow = await store.create_flow("kyc", "identity check")
        assert flow.flow_id.startswith("flw_")
        assert (flow.name, flow.description, flow.latest_version, dict(flow.published_versions)) == (
            "kyc", "identity check", 0, {},
        )
        assert flow.create_time == flow.update_time == T0
        assert await store.get_flow(flow.flow_id) == flow

        clock.advance(timedelta(minutes=1))
        v1 = await store.create_flow_version(flow.flow_id, GRAPH, TIMEOUT)
        assert (v1.version, v1.state, v1.execution_timeout, v1.publish_time) == (1, FlowVersionState.DRAFT, TIMEOUT, None)
        assert v1.create_time == T0 + timedelta(minutes=1)
        assert await store.get_flow_version(flow.flow_id, 1) == v1
        v2 = await store.create_flow_version(flow.flow_id, GRAPH, timedelta(minutes=5))
        assert v2.version == 2
        assert (await store.get_flow(flow.flow_id)).latest_version == 2

        with pytest.raises(FailedPrecondition) as info:
            await store.create_session(new_session(flow.flow_id, "ses_early"), None)
        assert info.value.reason == "FLOW_NOT_PUBLISHED"

        clock.advance(timedelta(minutes=1))
        published_at = clock.now()
        version, flow_after = await store.publish_flow_version(flow.flow_id, 1, ENV)
        assert version.state is FlowVersionState.PUBLISHED
        assert version.publish_time == published_at
        assert version.environments == (ENV,)
        assert version.graph == GRAPH
        assert dict(flow_after.published_versions) == {ENV: 1}
        assert await store.get_flow(flow.flow_id) == flow_after
        assert await store.get_flow_version(flow.flow_id, 1) == version
        assert [v.version for v in await store.list_flow_versions(flow.flow_id, 0, 10)] == [1, 2]

        clock.advance(timedelta(minutes=1))
        created_at = clock.now()
        session, replayed = await store.create_session(new_session(flow.flow_id, "ses_1"), None)
        assert not replayed
        assert session.status is SessionStatus.RUNNING
        assert (session.flow_id, session.flow_version, session.environment) == (flow.flow_id, 1, ENV)
        assert session.current_step_id == "check" and session.version == 1
        assert session.create_time == created_at
        assert session.expire_time == created_at + TIMEOUT  # the published version's timeout, not v2's
        assert session.input == {"country": "FR", "n": 1}
        assert session.metadata == {"customer": "ses_1"}
        assert await store.get_session(ENV, "ses_1") == session

        [created] = await store.events_after("ses_1", 0)
        assert (created.type, created.version, created.session) == (EventType.CREATED, 1, session)
        assert created.cursor > 0
        assert rec.events == [created]

        with pytest.raises(NotFound) as info:
            await store.get_session("test", "ses_1")  # another environment's session
        assert info.value.reason == "SESSION_NOT_FOUND"
        with pytest.raises(NotFound) as info:
            await store.get_session(ENV, "ses_nope")
        assert info.value.reason == "SESSION_NOT_FOUND"
        with pytest.raises(NotFound) as info:
            await store.get_flow("flw_nope")
        assert info.value.reason == "FLOW_NOT_FOUND"
        with pytest.raises(NotFound) as info:
            await store.get_flow_version(flow.flow_id, 9)
        assert info.value.reason == "FLOW_VERSION_NOT_FOUND"

    run(tmp_path, body, clock)


class CommitsDuringFirstSelect:
    """A reader's connection on which another connection (another process, or this one's writer) commits
    ``write`` while the read's first SELECT is open: what a read of several statements must not see half of."""

    def __init__(self, conn: sqlite3.Connection, path: str, write: Callable[[sqlite3.Connection], Any]):
        self._conn = conn
        self._path = path
        self._write: Callable[[sqlite3.Connection], Any] | None = write

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        cursor = self._conn.execute(sql, *args)
        if self._write is not None and sql.lstrip().upper().startswith("SELECT"):
            write, self._write = self._write, None
            other = schema.connect(self._path)
            try:
                other.execute("BEGIN IMMEDIATE")
                write(other)
                other.execute("COMMIT")
            finally:
                other.close()
        return cursor


def _consistent(flows: list[Flow], versions: list[Any]) -> None:
    for flow in flows:
        assert all(v <= flow.latest_version for v in flow.published_versions.values()), flow
    for fv in versions:
        assert fv.state is FlowVersionState.PUBLISHED or not fv.environments, fv
    for environment in (ENV, "staging"):
        assert len([fv for fv in versions if environment in fv.environments]) <= 1, versions


@pytest.mark.parametrize("read", ["get_flow", "list_flows", "get_flow_version", "list_flow_versions"])
def test_a_read_of_a_flow_or_its_versions_sees_one_commit_whole(tmp_path: Path, read: str) -> None:
    """Each read ran its statements (the rows, then each one's publications) in a snapshot of its own:
    a publish committed in between gave a DRAFT published to live, two versions published to live, or a
    flow with a version published beyond its latest_version."""

    async def body(store: Store, rec: Recorder) -> str:
        flow = await published_flow(store)
        await store.create_flow_version(flow.flow_id, GRAPH, TIMEOUT)
        return flow.flow_id

    flow_id = run(tmp_path, body)

    def publish_2_then_3(conn: sqlite3.Connection) -> None:
        commands.publish_flow_version(flow_id, 2, ENV, T0)(conn)
        commands.create_flow_version(flow_id, GRAPH, TIMEOUT, T0)(conn)
        commands.publish_flow_version(flow_id, 3, "staging", T0)(conn)

    conn = schema.connect(db(tmp_path), create=False)
    try:
        racing: Any = CommitsDuringFirstSelect(conn, db(tmp_path), publish_2_then_3)
        if read == "get_flow":
            flow = reads.get_flow(racing, flow_id)
            assert flow is not None
            _consistent([flow], [])
        elif read == "list_flows":
            _consistent(reads.list_flows(racing, None, 10), [])
        elif read == "get_flow_version":
            _consistent([], [reads.get_flow_version(racing, flow_id, 2)])
        else:
            _consistent([], reads.list_flow_versions(racing, flow_id, 0, 10))
        assert not conn.in_transaction  # the read's snapshot ended with it
        assert reads.get_flow_version(conn, flow_id, 2).environments == (ENV,)  # and the next read sees the commit
    finally:
        conn.close()


# Group commit


def test_concurrent_changes_and_creates_all_commit_with_gapless_versions(tmp_path: Path) -> None:
    n_sessions, changes_each, n_creates = 20, 10, 50

    async def body(store: Store, rec: Recorder) -> None:
        flow = await published_flow(store)
        ids = [f"ses_{i:02d}" for i in range(n_sessions)]
        await asyncio.gather(*(create(store, flow.flow_id, sid) for sid in ids))
        start = len(rec.calls)

        # Interleave: s0, s1, ..., s19, s0, s1, ... so each batch touches every session many times.
        order = [ids[i % n_sessions] for i in range(n_sessions * changes_each)]
        calls = [store.change_session(ENV, sid, report("check", "retry")) for sid in order]
        calls += [store.create_session(new_session(flow.flow_id, f"ses_new_{i:02d}"), None) for i in range(n_creates)]
        results = await gathered_in_one_go(store, *calls)

        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors == []
        changed, created = results[: len(order)], results[len(order):]
        # Each session's changes took versions 2..11, in the order they were submitted.
        by_session: dict[str, list[int]] = {}
        for sid, session in zip(order, changed):
            assert session.session_id == sid and session.status is SessionStatus.RUNNING
            by_session.setdefault(sid, []).append(session.version)
        assert by_session == {sid: list(range(2, changes_each + 2)) for sid in ids}
        assert all(not replayed and s.version == 1 for s, replayed in created)

        # Group commit: 250 commands, at most two commits.
        batches = batches_since(rec, start)
        assert 1 <= len(batches) <= 2
        assert sum(len(b) for b in batches) == len(calls)

        # The log agrees: gapless versions, one event per change.
        for sid in ids:
            log = await store.events_after(sid, 0)
            assert [e.version for e in log] == list(range(1, changes_each + 2))
            assert [e.type for e in log] == [EventType.CREATED] + [EventType.STEP_COMPLETED] * changes_each
            assert (await store.get_session(ENV, sid)).version == changes_each + 1
        for session, _ in created:
            assert [e.version for e in await store.events_after(session.session_id, 0)] == [1]

    run(tmp_path, body)


def test_failing_command_does_not_roll_back_its_batch(tmp_path: Path) -> None:
    async def body(store: Store, rec: Recorder) -> None:
        flow = await published_flow(store)
        for sid in ("ses_a", "ses_b", "ses_c", "ses_first"):
            await create(store, flow.flow_id, sid)
        await store.change_session(ENV, "ses_b", abort())  # ses_b is terminal from now on
        start = len(rec.calls)

        results = await gathered_in_one_go(
            store,
            store.change_session(ENV, "ses_first", report("check", "retry")),
            store.change_session(ENV, "ses_a", report("check", "retry")),
            store.change_session(ENV, "ses_b", report("check", "retry")),  # refused: terminal
            store.change_session(ENV, "ses_c", report("check", "nonsense")),  # refused: unknown verdict
            store.change_session(ENV, "ses_c", report("check", "ok")),
            store.create_session(new_session(flow.flow_id, "ses_d"), None),
            store.change_session(ENV, "ses_nope", abort()),  # refused: not found
            store.create_session(new_session(flow.flow_id, "ses_a"), None),  # refused: duplicate id
            store.change_session(ENV, "ses_a", report("check", "retry", expected_version=7)),  # refused: etag
            store.change_session(ENV, "ses_a", report("check", "retry")),
        )
        first, a, b, c_bad, c, d, nope, dup, etag, a2 = results
        assert isinstance(b, FailedPrecondition) and b.reason == "SESSION_TERMINAL"
        assert getattr(c_bad, "reason", None) == "UNKNOWN_VERDICT"
        assert isinstance(nope, NotFound)
        assert isinstance(dup, Exception)  # the session_id is taken
        assert isinstance(etag, VersionMismatch)
        assert (first.version, a.version, a2.version) == (2, 2, 3)
        assert c.status is SessionStatus.COMPLETED and c.version == 2
        assert d[0].version == 1

        # Everything that succeeded is committed, the refusals left nothing behind.
        batches = batches_since(rec, start)
        assert 1 <= len(batches) <= 2
        committed = [(e.session_id, e.version, e.type) for b_ in batches for e in b_]
        cursors = [e.cursor for b_ in batches for e in b_]
        assert cursors == list(range(cursors[0], cursors[0] + 5))  # refusals leave no hole in the log
        assert cursors[0] == max(e.cursor for e in rec.events[:-5]) + 1
        assert committed == [
            ("ses_first", 2, EventType.STEP_COMPLETED),
            ("ses_a", 2, EventType.STEP_COMPLETED),
            ("ses_c", 2, EventType.COMPLETED),
            ("ses_d", 1, EventType.CREATED),
            ("ses_a", 3, EventType.STEP_COMPLETED),
        ]
        assert (await store.get_session(ENV, "ses_a")).version == 3
        assert (await store.get_session(ENV, "ses_c")).status is SessionStatus.COMPLETED
        assert (await store.get_session(ENV, "ses_d")).version == 1
        b_now = await store.get_session(ENV, "ses_b")
        assert (b_now.status, b_now.version) == (SessionStatus.ABORTED, 2)
        assert [e.version for e in await store.events_after("ses_b", 0)] == [1, 2]
        assert (await store.get_session(ENV, "ses_a")).metadata == {"customer": "ses_a"}  # not the duplicate's

    run(tmp_path, body)


# on_commit and the log


def test_on_commit_gets_events_in_cursor_order_once_each(tmp_path: Path) -> None:
    async def body(store: Store, rec: Recorder) -> None:
        flow = await published_flow(store)
        ids = [f"ses_{i}" for i in range(5)]
        await asyncio.gather(*(create(store, flow.flow_id, sid) for sid in ids))
        await asyncio.gather(*(store.change_session(ENV, sid, report("check", "retry")) for sid in ids * 4))
        await asyncio.gather(*(store.change_session(ENV, sid, report("check", "ok")) for sid in ids))

        # A commit is announced by the time its caller hears back.
        s = await create(store, flow.flow_id, "ses_last")
        assert rec.events[-1].session == s and rec.events[-1].type is EventType.CREATED

        got = rec.events
        assert rec.threads == {threading.get_ident()}  # called on the event loop's thread
        cursors = [e.cursor for e in got]
        # Increasing and, in one process, without holes (the change feed's fast path relies on it).
        assert cursors == list(range(cursors[0], cursors[0] + len(cursors)))
        assert Counter((e.session_id, e.version) for e in got) == Counter(
            {(sid, v): 1 for sid in ids for v in range(1, 7)} | {("ses_last", 1): 1}
        )
        log = sorted(
            [e for sid in [*ids, "ses_last"] for e in await store.events_after(sid, 0)], key=lambda e: e.cursor
        )
        assert [(e.cursor, e.session_id, e.version, e.type) for e in got] == [
            (e.cursor, e.session_id, e.version, e.type) for e in log
        ]
        assert [e.session for e in got] == [e.session for e in log]
        assert rec.health == []  # healthy all along: no health change reported

    run(tmp_path, body)


def test_events_after_returns_the_log(tmp_path: Path) -> None:
    clock = FakeClock(T0)

    async def body(store: Store, _rec: Recorder) -> None:
        flow = await published_flow(store)
        await create(store, flow.flow_id, "ses_1")
        clock.advance(timedelta(seconds=10))
        await store.change_session(ENV, "ses_1", report("check", "retry"))
        clock.advance(timedelta(seconds=10))
        done = await store.change_session(ENV, "ses_1", report("check", "bad"))

        log = await store.events_after("ses_1", 0)
        assert [(e.version, e.type) for e in log] == [
            (1, EventType.CREATED), (2, EventType.STEP_COMPLETED), (3, EventType.COMPLETED),
        ]
        assert [e.event_time for e in log] == [T0, T0 + timedelta(seconds=10), T0 + timedelta(seconds=20)]
        assert [e.session.version for e in log] == [1, 2, 3]
        assert log[1].session.last_step is not None and log[1].session.last_step.verdict == "retry"
        assert log[-1].session == done
        assert done.outcome is SessionOutcome.REJECTED and done.end_time == T0 + timedelta(seconds=20)
        assert log[0].cursor < log[1].cursor < log[2].cursor
        assert all(e.session.input == {"country": "FR", "n": 1} for e in log)
        assert await store.events_after("ses_1", 2) == log[2:]
        assert await store.events_after("ses_1", 3) == []
        assert await store.events_after("ses_nope", 0) == []

    run(tmp_path, body, clock)


# Expiry


def test_get_session_expires_an_overdue_session(tmp_path: Path) -> None:
    clock = FakeClock(T0)

    async def body(store: Store, rec: Recorder) -> None:
        flow = await published_flow(store)
        created = await create(store, flow.flow_id, "ses_1")

        clock.advance(TIMEOUT - US)
        assert (await store.get_session(ENV, "ses_1")).status is SessionStatus.RUNNING
        assert len(rec.events) == 1

        clock.advance(US + timedelta(minutes=3))  # 3 minutes past the deadline
        s = await store.get_session(ENV, "ses_1")
        assert s.status is SessionStatus.EXPIRED
        assert s.version == 2
        assert s.end_time == created.expire_time  # the deadline, not when it was noticed
        assert s.update_time == clock.now()
        [expired] = await store.events_after("ses_1", 1)
        assert (expired.type, expired.version, expired.session) == (EventType.EXPIRED, 2, s)
        assert [(e.type, e.version) for e in rec.events] == [(EventType.CREATED, 1), (EventType.EXPIRED, 2)]

        # Reading again changes nothing.
        assert await store.get_session(ENV, "ses_1") == s
        assert len(await store.events_after("ses_1", 0)) == 2
        assert len(rec.events) == 2

    run(tmp_path, body, clock)


def test_change_on_overdue_session_expires_it_and_is_refused(tmp_path: Path) -> None:
    clock = FakeClock(T0)

    async def body(store: Store, rec: Recorder) -> None:
        flow = await published_flow(store)
        await create(store, flow.flow_id, "ses_1")
        clock.advance(TIMEOUT)  # exactly at the deadline: already overdue

        with pytest.raises(FailedPrecondition) as info:
            await store.change_session(ENV, "ses_1", report("check", "ok"))
        assert info.value.reason == "SESSION_TERMINAL"
        assert info.value.metadata["status"] == "EXPIRED"

        # The expiry stays committed (and was announced); the change did not land.
        assert [(e.type, e.version) for e in await store.events_after("ses_1", 0)] == [
            (EventType.CREATED, 1), (EventType.EXPIRED, 2),
        ]
        assert [(e.type, e.version) for e in rec.events] == [(EventType.CREATED, 1), (EventType.EXPIRED, 2)]
        s = await store.get_session(ENV, "ses_1")
        assert (s.status, s.version, s.last_step, s.outcome) == (SessionStatus.EXPIRED, 2, None, SessionOutcome.UNSPECIFIED)

        with pytest.raises(FailedPrecondition) as info:
            await store.change_session(ENV, "ses_1", abort())
        assert info.value.reason == "SESSION_TERMINAL"
        assert len(await store.events_after("ses_1", 0)) == 2  # no second expiry

    run(tmp_path, body, clock)


def test_racing_expiries_of_one_session_append_one_event(tmp_path: Path) -> None:
    clock = FakeClock(T0)

    async def body(store: Store, rec: Recorder) -> None:
        flow = await published_flow(store)
        await create(store, flow.flow_id, "ses_1")
        clock.advance(TIMEOUT + timedelta(seconds=1))
        results = await gathered_in_one_go(
            store,
            *(store.get_session(ENV, "ses_1") for _ in range(5)),
            store.change_session(ENV, "ses_1", abort()),
            store.expire_due(),
            writes=2,  # the reads submit theirs once they have read
        )
        *reads_, refused, _expired_count = results
        assert all(isinstance(r, Session) and r.status is SessionStatus.EXPIRED and r.version == 2 for r in reads_)
        assert isinstance(refused, FailedPrecondition) and refused.reason == "SESSION_TERMINAL"
        assert [(e.type, e.version) for e in await store.events_after("ses_1", 0)] == [
            (EventType.CREATED, 1), (EventType.EXPIRED, 2),
        ]
        assert [e.type for e in rec.events].count(EventType.EXPIRED) == 1

    run(tmp_path, body, clock)


def test_list_sessions_never_shows_an_overdue_session_as_running(tmp_path: Path) -> None:
    clock = FakeClock(T0)

    async def body(store: Store, _rec: Recorder) -> None:
        flow = await published_flow(store)
        await create(store, flow.flow_id, "ses_old")
        clock.advance(timedelta(minutes=30))
        await create(store, flow.flow_id, "ses_new")
        clock.advance(timedelta(minutes=30))  # ses_old is exactly due
        running = await store.list_sessions(ENV, flow.flow_id, (SessionStatus.RUNNING,), None, 10)
        assert [(s.session_id, s.status) for s in running] == [("ses_new", SessionStatus.RUNNING)]
        listed = await store.list_sessions(ENV, "", (), None, 10)
        assert [(s.session_id, s.status) for s in listed] == [
            ("ses_new", SessionStatus.RUNNING), ("ses_old", SessionStatus.EXPIRED),
        ]
        assert [e.type for e in await store.events_after("ses_old", 0)] == [EventType.CREATED, EventType.EXPIRED]

    run(tmp_path, body, clock)


def test_list_sessions_expires_every_overdue_session_a_running_filter_pages_through(tmp_path: Path) -> None:
    clock = FakeClock(T0)

    async def body(store: Store, _rec: Recorder) -> None:
        hour = await published_flow(store)
        await create(store, hour.flow_id, "ses_a1")
        await create(store, hour.flow_id, "ses_a2")
        short = await published_flow(store, timeout=timedelta(minutes=10))
        clock.advance(timedelta(minutes=1))
        for n in range(5):  # the newest sessions, and the first to be due
            await create(store, short.flow_id, f"ses_b{n}")
        clock.advance(timedelta(minutes=30))
        running = await store.list_sessions(ENV, "", (SessionStatus.RUNNING,), None, 2)
        assert sorted(s.session_id for s in running) == ["ses_a1", "ses_a2"]
        assert {s.status for s in await store.list_sessions(ENV, short.flow_id, (), None, 10)} == {SessionStatus.EXPIRED}

    run(tmp_path, body, clock)


def scheduler_first(monkeypatch: pytest.MonkeyPatch, then: Callable[[], None] = lambda: None) -> None:
    """Every expire_sessions command finds the expiry scheduler's pass got there first, then runs ``then``."""
    real = commands.expire_sessions

    def expire_sessions(environment: str, session_ids: list[str], now: datetime) -> writer.Command:
        def run(conn: sqlite3.Connection) -> writer.Done[int]:
            theirs = commands.expire_due(1000, now)(conn)
            mine = real(environment, session_ids, now)(conn)
            then()
            return writer.Done(mine.value, theirs.events + mine.events)

        return run

    monkeypatch.setattr(commands, "expire_sessions", expire_sessions)


def test_list_sessions_reads_again_when_another_writer_expired_the_page_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock(T0)
    scheduler_first(monkeypatch)

    async def body(store: Store, _rec: Recorder) -> None:
        flow = await published_flow(store)
        await create(store, flow.flow_id, "ses_1")
        clock.advance(TIMEOUT)
        listed = await store.list_sessions(ENV, "", (), None, 10)
        assert [(s.session_id, s.status) for s in listed] == [("ses_1", SessionStatus.EXPIRED)]

    run(tmp_path, body, clock)


def test_list_sessions_never_shows_running_past_a_deadline_that_passed_while_another_writer_expired_the_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock(T0)
    scheduler_first(monkeypatch, then=lambda: clock.advance(timedelta(minutes=1)))  # the next deadline passes meanwhile

    async def body(store: Store, _rec: Recorder) -> None:
        flow = await published_flow(store)
        await create(store, flow.flow_id, "ses_1")
        clock.advance(timedelta(minutes=1))
        await create(store, flow.flow_id, "ses_2")
        clock.advance(TIMEOUT - timedelta(minutes=1))  # ses_1 is due, ses_2 a minute later
        listed = await store.list_sessions(ENV, "", (), None, 10)
        now = clock.now()
        assert [s.session_id for s in listed if s.status is SessionStatus.RUNNING and now >= s.expire_time] == []
        assert [(s.session_id, s.status) for s in listed] == [
            ("ses_2", SessionStatus.EXPIRED), ("ses_1", SessionStatus.EXPIRED),
        ]

    run(tmp_path, body, clock)


def test_expire_due_expires_only_due_sessions(tmp_path: Path) -> None:
    clock = FakeClock(T0)

    async def body(store: Store, rec: Recorder) -> None:
        flow = await published_flow(store)
        await create(store, flow.flow_id, "ses_early")  # due at T0 + 1h
        await create(store, flow.flow_id, "ses_aborted")
        await store.change_session(ENV, "ses_aborted", abort())
        clock.advance(timedelta(minutes=30))
        await create(store, flow.flow_id, "ses_late")  # due at T0 + 1h30
        assert await store.next_expiry() == T0 + TIMEOUT

        clock.advance(timedelta(minutes=30) - US)  # one microsecond before the first deadline
        assert await store.expire_due() == 0

        clock.advance(US)
        start = len(rec.events)
        assert await store.expire_due() == 1
        assert [(e.session_id, e.type) for e in rec.events[start:]] == [("ses_early", EventType.EXPIRED)]
        assert await store.expire_due() == 0  # already done
        assert await store.next_expiry() == T0 + timedelta(minutes=90)

        early = await store.get_session(ENV, "ses_early")
        assert (early.status, early.end_time) == (SessionStatus.EXPIRED, T0 + TIMEOUT)
        late = await store.get_session(ENV, "ses_late")
        assert (late.status, late.version) == (SessionStatus.RUNNING, 1)
        aborted = await store.get_session(ENV, "ses_aborted")
        assert (aborted.status, aborted.version) == (SessionStatus.ABORTED, 2)

        clock.advance(timedelta(days=1))
        assert await store.expire_due() == 1
        assert (await store.get_session(ENV, "ses_late")).status is SessionStatus.EXPIRED
        assert (await store.get_session(ENV, "ses_aborted")).version == 2  # terminal sessions are left alone
        assert await store.next_expiry() is None

    run(tmp_path, body, clock)


def test_expire_due_respects_limit_and_deadline_order(tmp_path: Path) -> None:
    clock = FakeClock(T0)

    async def body(store: Store, rec: Recorder) -> None:
        flow = await published_flow(store)
        for i in range(3):
            await create(store, flow.flow_id, f"ses_{i}")
            clock.advance(timedelta(minutes=1))
        clock.advance(timedelta(days=1))
        start = len(rec.events)
        assert await store.expire_due(limit=2) == 2
        assert [e.session_id for e in rec.events[start:]] == ["ses_0", "ses_1"]  # earliest deadlines first
        assert await store.expire_due(limit=2) == 1
        assert [e.session_id for e in rec.events[start:]] == ["ses_0", "ses_1", "ses_2"]

    run(tmp_path, body, clock)


def test_a_lost_guarded_update_says_the_session_s_current_version(tmp_path: Path) -> None:
    """The UPDATE of a change is guarded by the version it was computed from; losing that race answers
    VERSION_MISMATCH with the current version, as every VERSION_MISMATCH does."""

    async def body(store: Store, _rec: Recorder) -> None:
        flow = await published_flow(store)
        stale = await create(store, flow.flow_id, "ses_1")
        await store.change_session(ENV, "ses_1", report("check", "retry"))

        def lost(now: datetime) -> Callable[[sqlite3.Connection], None]:
            return lambda conn: commands._apply(conn, stale, abort()(stale, None, now))

        with pytest.raises(VersionMismatch) as info:
            await store._write(lost)
        assert info.value.metadata == {"version": "2"}
        assert (await store.get_session(ENV, "ses_1")).version == 2

    run(tmp_path, body)


# Idempotency


def test_create_session_idempotency(tmp_path: Path) -> None:
    async def body(store: Store, rec: Recorder) -> None:
        flow = await published_flow(store)
        key = IdempotencyKey(f"create:{ENV}", "req-1", "fingerprint-A")
        first, replayed = await store.create_session(new_session(flow.flow_id, "ses_first"), key)
        assert not replayed
        events_before = len(rec.events)

        # The retry carries a fresh server-generated id; it gets the first session back.
        again, replayed = await store.create_session(new_session(flow.flow_id, "ses_retry"), key)
        assert replayed
        assert again == first
        assert len(rec.events) == events_before  # nothing new committed
        with pytest.raises(NotFound):
            await store.get_session(ENV, "ses_retry")

        # A replay answers as the first call did, even after the session moved on.
        await store.change_session(ENV, "ses_first", abort())
        later, replayed = await store.create_session(new_session(flow.flow_id, "ses_retry2"), key)
        assert replayed and later == first and later.status is SessionStatus.RUNNING

        with pytest.raises(AlreadyExists) as info:
            await store.create_session(
                new_session(flow.flow_id, "ses_other"), IdempotencyKey(f"create:{ENV}", "req-1", "fingerprint-B")
            )
        assert info.value.reason == "REQUEST_ID_REUSED"
        assert info.value.metadata == {"request_id": "req-1", "session_id": "ses_first"}
        with pytest.raises(NotFound):
            await store.get_session(ENV, "ses_other")

        # The same request_id in another scope is a different request.
        other, replayed = await store.create_session(
            new_session(flow.flow_id, "ses_scoped"), IdempotencyKey("create:elsewhere", "req-1", "fingerprint-B")
        )
        assert not replayed and other.session_id == "ses_scoped"

    run(tmp_path, body)


def test_request_ids_are_kept_for_the_retention_period_after_their_session_ended(tmp_path: Path) -> None:
    """Retention drops an id once its session has been over for the retention period, counted from the
    end: a session that ran longer than that kept its ids only until it ended, and a retry of its
    CreateSession just after made a second session."""
    clock = FakeClock(T0)
    week = timedelta(days=7)

    async def body(store: Store, _rec: Recorder) -> None:
        flow = await published_flow(store, timeout=timedelta(days=30))
        long_key = IdempotencyKey(f"create:{ENV}", "req-long", "fp")
        short_key = IdempotencyKey(f"create:{ENV}", "req-short", "fp")
        await create(store, flow.flow_id, "ses_long", long_key)
        await create(store, flow.flow_id, "ses_short", short_key)
        await store.change_session(ENV, "ses_short", abort())

        async def replays(key: IdempotencyKey, new_id: str) -> bool:
            session, replayed = await store.create_session(new_session(flow.flow_id, new_id), key)
            assert replayed or session.session_id == new_id
            return replayed

        clock.advance(timedelta(days=8))
        await store.prune_events(week)
        assert await replays(long_key, "ses_long_again")  # RUNNING: kept however old
        assert not await replays(short_key, "ses_short_again")  # ended 8 days ago: gone
        await store.change_session(ENV, "ses_long", abort())
        clock.advance(timedelta(days=3))
        await store.prune_events(week)
        assert await replays(long_key, "ses_long_again")  # created 11 days ago, ended 3 days ago: kept
        clock.advance(timedelta(days=5))
        await store.prune_events(week)
        assert not await replays(long_key, "ses_long_again")  # ended 8 days ago: gone

    run(tmp_path, body, clock)


def test_concurrent_creates_with_one_request_id_make_one_session(tmp_path: Path) -> None:
    async def body(store: Store, _rec: Recorder) -> None:
        flow = await published_flow(store)
        key = IdempotencyKey(f"create:{ENV}", "req-race", "fp")
        results = await asyncio.gather(
            *(store.create_session(new_session(flow.flow_id, f"ses_{i}"), key) for i in range(10))
        )
        assert [replayed for _, replayed in results].count(False) == 1
        assert len({s.session_id for s, _ in results}) == 1
        winner = results[0][0].session_id
        for i in range(10):
            if f"ses_{i}" != winner:
                assert await store.events_after(f"ses_{i}", 0) == []

    run(tmp_path, body)


def test_change_session_idempotency(tmp_path: Path) -> None:
    async def body(store: Store, _rec: Recorder) -> None:
        flow = await published_flow(store)
        await create(store, flow.flow_id, "ses_1")
        key = IdempotencyKey("report:ses_1", "req-r", "fp-1")
        first = await store.change_session(ENV, "ses_1", report("check", "retry"), key)
        assert first.version == 2
        again = await store.change_session(ENV, "ses_1", report("check", "retry"), key)
        assert again == first
        assert [e.version for e in await store.events_after("ses_1", 0)] == [1, 2]
        with pytest.raises(AlreadyExists) as info:
            await store.change_session(ENV, "ses_1", report("check", "ok"), IdempotencyKey("report:ses_1", "req-r", "fp-2"))
        assert info.value.reason == "REQUEST_ID_REUSED"
        assert (await store.get_session(ENV, "ses_1")).version == 2

    run(tmp_path, body)


def test_replays_past_the_deadline_answer_the_expired_session(tmp_path: Path) -> None:
    # "No read returns RUNNING after expire_time" holds for retried calls too: the first answer said
    # RUNNING, so a retry past the deadline expires the session (one event) and answers that.
    clock = FakeClock(T0)

    async def body(store: Store, rec: Recorder) -> None:
        flow = await published_flow(store)
        create_key = IdempotencyKey(f"create:{ENV}", "req-c", "fp")
        first, _ = await store.create_session(new_session(flow.flow_id, "ses_1"), create_key)
        report_key = IdempotencyKey("report:ses_1", "req-r", "fp")
        reported = await store.change_session(ENV, "ses_1", report("check", "retry"), report_key)
        clock.advance(TIMEOUT)  # exactly at the deadline: overdue

        again, replayed = await store.create_session(new_session(flow.flow_id, "ses_retry"), create_key)
        assert replayed and again.session_id == "ses_1"
        assert (again.status, again.version, again.end_time) == (SessionStatus.EXPIRED, 3, first.expire_time)
        retried = await store.change_session(ENV, "ses_1", report("check", "retry"), report_key)
        assert retried == again  # already expired: answered as it stands, not expired twice
        assert [(e.type, e.version) for e in rec.events if e.session_id == "ses_1"] == [
            (EventType.CREATED, 1), (EventType.STEP_COMPLETED, 2), (EventType.EXPIRED, 3),
        ]
        assert reported.version == 2

    run(tmp_path, body, clock)


# Durability and shutdown


def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = db(tmp_path)
    clock = FakeClock(T0)

    async def write(store: Store, _rec: Recorder) -> Any:
        flow = await published_flow(store)
        await create(store, flow.flow_id, "ses_1")
        await create(store, flow.flow_id, "ses_2")
        await store.change_session(ENV, "ses_1", report("check", "retry"))
        await store.change_session(ENV, "ses_2", abort("changed my mind"))
        return (
            store.keys,
            await store.get_flow(flow.flow_id),
            await store.get_flow_version(flow.flow_id, 1),
            [await store.get_session(ENV, sid) for sid in ("ses_1", "ses_2")],
            [await store.events_after(sid, 0) for sid in ("ses_1", "ses_2")],
        )

    before = asyncio.run(with_store(path, clock, write))
    keys, flow, version, sessions, logs = before

    async def read(store: Store, rec: Recorder) -> None:
        assert store.keys == keys
        assert await store.get_flow(flow.flow_id) == flow
        assert await store.get_flow_version(flow.flow_id, 1) == version
        assert [await store.get_session(ENV, sid) for sid in ("ses_1", "ses_2")] == sessions
        assert [await store.events_after(sid, 0) for sid in ("ses_1", "ses_2")] == logs
        # Writes continue where they stopped: next version, a later cursor.
        s = await store.change_session(ENV, "ses_1", report("check", "ok"))
        assert s.version == 3 and s.status is SessionStatus.COMPLETED
        assert rec.events[-1].cursor > max(e.cursor for log in logs for e in log)

    asyncio.run(with_store(path, clock, read))


def test_close_commits_accepted_writes_then_refuses_new_ones(tmp_path: Path) -> None:
    path = db(tmp_path)
    clock = FakeClock(T0)

    async def body() -> None:
        rec = Recorder()
        store = Store(path, clock)
        try:
            await store.open(rec.on_commit, rec.on_health)
            flow = await published_flow(store)
            await create(store, flow.flow_id, "ses_1")
            pending = asyncio.gather(*(store.change_session(ENV, "ses_1", report("check", "retry")) for _ in range(30)))
            await asyncio.sleep(0)  # every change is queued
        finally:
            await store.close()
        results = await asyncio.wait_for(pending, DEADLINE_S)
        assert [s.version for s in results] == list(range(2, 32))
        with pytest.raises(Unavailable) as info:
            await store.change_session(ENV, "ses_1", report("check", "retry"))
        assert info.value.reason == "SHUTTING_DOWN"

    asyncio.run(body())

    async def check(store: Store, _rec: Recorder) -> None:
        assert (await store.get_session(ENV, "ses_1")).version == 31

    asyncio.run(with_store(path, clock, check))


def test_a_write_waiting_for_another_process_lock_leaves_the_event_loop_free(tmp_path: Path) -> None:
    """The write lock is held elsewhere (another process writing): the waiting write must not stall the
    loop, or this test's own ROLLBACK of the lock could never run."""

    async def body(store: Store, rec: Recorder) -> None:
        flow = await published_flow(store)
        with write_lock_held(db(tmp_path)):
            pending = asyncio.ensure_future(store.create_session(new_session(flow.flow_id, "ses_1"), None))
            for _ in range(50):  # many turns of the loop while the write waits
                await asyncio.sleep(0)
            assert not pending.done()
            assert (await store.get_flow(flow.flow_id)).flow_id == flow.flow_id  # reads go on meanwhile
        session, _ = await asyncio.wait_for(pending, DEADLINE_S)
        assert session.version == 1 and rec.events[-1].session_id == "ses_1"

    run(tmp_path, body)


def test_a_write_lock_held_elsewhere_too_long_fails_the_batch_then_writes_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "LOCK_WAIT_MS", 50)

    async def body(store: Store, rec: Recorder) -> None:
        flow = await published_flow(store)
        with write_lock_held(db(tmp_path)):
            with pytest.raises(Unavailable) as info:
                await store.create_session(new_session(flow.flow_id, "ses_1"), None)
            assert info.value.reason == "STORE_UNAVAILABLE" and info.value.retry_after
            assert rec.health[-1] is False and not store.writable
        session, _ = await store.create_session(new_session(flow.flow_id, "ses_1"), None)
        assert session.version == 1 and rec.health[-1] is True

    run(tmp_path, body)


@pytest.mark.parametrize("mode, level", [("FULL", 2), ("NORMAL", 1)])
def test_the_write_connection_runs_the_synchronous_mode_asked_for(tmp_path: Path, mode: str, level: int) -> None:
    """FULL (the default) is what makes an answered write survive a power cut."""

    async def body() -> None:
        store = Store(db(tmp_path), FakeClock(T0), **({} if mode == "FULL" else {"synchronous": mode}))
        await store.open(Recorder().on_commit, Recorder().on_health)
        try:
            assert store._writer is not None and store._writer._conn is not None
            assert store._writer._conn.execute("PRAGMA synchronous").fetchone()[0] == level
            assert store._writer._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            await store.close()

    asyncio.run(body())


class Disk:
    """How long the writer's COMMITs are timed at (they run for real): the test says how fast the disk
    is, not this machine's disk, which takes 100 ms and more while other work shares it."""

    FAST = writer.SLOW_COMMIT_S / 4

    def __init__(self) -> None:
        self.took = self.FAST
        self.real_off_loop = False  # commits on the disk thread: their real time, waits for the GIL included
        self.release: threading.Event | None = None  # set: a commit on the disk thread waits for it first
        self._loop_thread = threading.get_ident()

    def timed_commit(self, w: writer.Writer, conn: sqlite3.Connection) -> float:
        off_loop = threading.get_ident() != self._loop_thread
        if off_loop and self.release is not None:
            assert self.release.wait(DEADLINE_S)
        real = REAL_TIMED_COMMIT(w, conn)
        return real if off_loop and self.real_off_loop else self.took


REAL_TIMED_COMMIT = writer.Writer._timed_commit


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Disk:
    """From the store's opening on, every COMMIT is timed as ``disk.took`` says."""
    timing = Disk()
    monkeypatch.setattr(writer.Writer, "_timed_commit", lambda w, conn: timing.timed_commit(w, conn))
    return timing


SLOW_SPELL_S = (writer.SLOW_COMMIT_S + writer.STALLED_COMMIT_S) / 2  # a slow disk, not a stalled one


def test_commits_run_on_the_loop_while_fast_and_on_the_disk_thread_once_slow(tmp_path: Path, disk: Disk) -> None:
    """A commit handed to a thread waits for that thread to win the GIL back (to start and to report):
    milliseconds of delivery latency under load. So fast commits run on the loop; once commits are slow
    (a slow disk) they run on the disk thread, and the loop serves reads meanwhile; fast again, they
    come back."""

    async def body(store: Store, rec: Recorder) -> None:
        w = store._writer
        assert w is not None
        flow = await published_flow(store)
        await create(store, flow.flow_id, "ses_1")
        assert w.commits_on_loop >= 3 and w.commits_on_disk == 0
        disk.took = SLOW_SPELL_S
        while w.commits_on_disk == 0:  # the moving average passes the limit after a few slow commits
            assert w.commits_on_loop < 100
            await store.change_session(ENV, "ses_1", report("check", "retry"))

        disk.took, disk.release = Disk.FAST, threading.Event()  # a disk that takes its time, timed fast
        on_disk = w.commits_on_disk
        version = (await store.get_session(ENV, "ses_1")).version
        change = asyncio.ensure_future(store.change_session(ENV, "ses_1", report("check", "retry")))
        read = await store.get_session(ENV, "ses_1")  # served while that commit waits on the disk thread
        assert read.version == version and not change.done() and w.commits_on_disk == on_disk + 1
        disk.release.set()
        assert (await change).version == version + 1
        disk.release = None

        on_loop = w.commits_on_loop
        for _ in range(100):  # the average falls back under the limit after a few fast commits
            await store.change_session(ENV, "ses_1", report("check", "retry"))
            if w.commits_on_loop > on_loop:
                break
        assert w.commits_on_loop > on_loop

    run(tmp_path, body)


def test_a_stalled_commit_keeps_commits_on_the_disk_thread_for_a_while(tmp_path: Path, disk: Disk) -> None:
    """The first commit of a disk stall cannot be foreseen and blocks the loop; the ones after it, even
    fast, stay on the disk thread for DISK_HOLD_S, so a disk stalling now and then does not stall the
    loop at every stall."""

    async def body(store: Store, rec: Recorder) -> None:
        w = store._writer
        assert w is not None
        flow = await published_flow(store)
        disk.took = writer.STALLED_COMMIT_S
        await create(store, flow.flow_id, "ses_1")  # on the loop: nothing said the disk would stall
        disk.took = Disk.FAST
        assert w._disk_until >= time.monotonic() + writer.DISK_HOLD_S - 1
        on_loop, on_disk = w.commits_on_loop, w.commits_on_disk
        for _ in range(20):  # fast commits, the average back under the limit: still on the disk thread
            await store.change_session(ENV, "ses_1", report("check", "retry"))
        assert w.commits_on_loop == on_loop and w.commits_on_disk == on_disk + 20
        w._disk_until = time.monotonic()  # as when DISK_HOLD_S has passed without another stall
        await store.change_session(ENV, "ses_1", report("check", "retry"))
        assert w.commits_on_loop == on_loop + 1

    run(tmp_path, body)


def test_commits_come_back_to_the_loop_from_the_disk_thread_while_the_loop_is_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disk: Disk
) -> None:
    """A commit on the disk thread is timed with its waits for the GIL (the sqlite3 module releases it
    for each step of COMMIT, os.stat for the file checks), each up to the 5 ms switch interval while the
    loop runs Python: a fast disk under load timed at 5-60 ms there, so once a slow spell had moved the
    commits off the loop, they never came back while the load lasted, the very load the loop commit is for."""
    monkeypatch.setattr(writer, "PROBE_S", 0.05, raising=False)

    async def body(store: Store, rec: Recorder) -> None:
        w = store._writer
        assert w is not None
        flow = await published_flow(store)
        await create(store, flow.flow_id, "ses_1")
        disk.took = SLOW_SPELL_S
        while w.commits_on_disk == 0:
            assert w.commits_on_loop < 100
            await store.change_session(ENV, "ses_1", report("check", "retry"))
        # The disk is fast again: on the loop a commit is timed fast, on the disk thread as it really
        # takes, with the waits for the GIL that the busy loop below causes.
        disk.took, disk.real_off_loop = Disk.FAST, True

        busy = True

        async def keep_the_loop_busy() -> None:  # as thousands of streams do: Python on the loop, seldom idle
            while busy:
                until_ = time.perf_counter() + 0.02
                while time.perf_counter() < until_:
                    pass
                await asyncio.sleep(0)  # yields the loop; not synchronisation

        burner = asyncio.ensure_future(keep_the_loop_busy())
        try:
            on_loop = w.commits_on_loop
            give_up = time.monotonic() + 3.0
            while w.commits_on_loop == on_loop:
                assert time.monotonic() < give_up, (
                    f"still on the disk thread after {w.commits_on_disk} commits there "
                    f"(average {w._commit_time * 1000:.1f} ms, held {w._disk_until > time.monotonic()})"
                )
                await store.change_session(ENV, "ses_1", report("check", "retry"))
        finally:
            busy = False
            await burner

    run(tmp_path, body)


def test_a_cancelled_close_still_answers_the_write_committing_on_the_disk_thread(tmp_path: Path) -> None:
    """Cancelling close() (a shutdown given up on by whoever awaited it) cancelled the writer task it
    awaited, in the middle of a COMMIT running on the disk thread: that COMMIT landed, its caller was
    never answered, and the connection was never closed (a second close() raised CancelledError)."""
    path = db(tmp_path)
    clock = FakeClock(T0)

    async def body() -> None:
        rec = Recorder()
        store = Store(path, clock)
        await store.open(rec.on_commit, rec.on_health)
        release = threading.Event()
        try:
            w = store._writer
            assert w is not None
            flow = await published_flow(store)
            await create(store, flow.flow_id, "ses_1")
            w._slow_commit = 0.0  # commits on the disk thread, as when they are slow
            timed_commit = w._timed_commit

            def held_commit(conn: sqlite3.Connection) -> float:
                assert release.wait(DEADLINE_S)  # a disk that takes its time
                return timed_commit(conn)

            w._timed_commit = held_commit  # type: ignore[method-assign]
            change = asyncio.ensure_future(store.change_session(ENV, "ses_1", report("check", "retry")))
            await until(lambda: w.commits_on_disk == 1)  # its COMMIT waits on the disk thread
            closing = asyncio.ensure_future(store.close())
            await until(lambda: w._closing)
            closing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await closing
            release.set()
            assert (await asyncio.wait_for(change, DEADLINE_S)).version == 2
            assert [e.version for e in rec.events if e.session_id == "ses_1"] == [1, 2]
        finally:
            release.set()
            await asyncio.wait_for(store.close(), DEADLINE_S)
        assert w._conn is not None
        with pytest.raises(sqlite3.ProgrammingError):  # closed
            w._conn.execute("SELECT 1")

    asyncio.run(body())

    async def check(store: Store, _rec: Recorder) -> None:
        assert (await store.get_session(ENV, "ses_1")).version == 2

    asyncio.run(with_store(path, clock, check))


def test_a_flow_version_read_in_a_batch_that_failed_to_commit_is_not_remembered(tmp_path: Path) -> None:
    """The writer's commands remember published flow versions (immutable once published). One read as
    published inside a batch whose COMMIT then failed was remembered although the publication was rolled
    back: the version was a draft again, was edited and published, and its sessions ran the old graph."""
    swapped = FlowGraph(
        "check",
        (
            Step("check", "document_check", {"retry": "check", "ok": "rejected", "bad": "accepted"}),
            Step("accepted", "end", outcome=SessionOutcome.ACCEPTED),
            Step("rejected", "end", outcome=SessionOutcome.REJECTED),
        ),
    )

    async def body(store: Store, rec: Recorder) -> None:
        w = store._writer
        assert w is not None
        flow = await store.create_flow("kyc", "identity check")
        await store.create_flow_version(flow.flow_id, GRAPH, TIMEOUT)
        commit = w._commit

        def disk_full(conn: sqlite3.Connection) -> None:
            w._commit = commit  # type: ignore[method-assign]  # once
            raise sqlite3.OperationalError("database or disk is full")

        w._commit = disk_full  # type: ignore[method-assign]
        commits = w.commits
        results = await gathered_in_one_go(
            store,
            store.publish_flow_version(flow.flow_id, 1, ENV),
            store.create_session(new_session(flow.flow_id, "ses_lost"), None),
            store.change_session(ENV, "ses_lost", report("check", "retry")),
        )
        assert w.commits == commits + 1  # one batch
        assert all(isinstance(r, Unavailable) for r in results)
        assert (await store.get_flow_version(flow.flow_id, 1)).state is FlowVersionState.DRAFT  # rolled back

        await store.update_flow_version(flow.flow_id, 1, swapped, TIMEOUT)
        await store.publish_flow_version(flow.flow_id, 1, ENV)
        await create(store, flow.flow_id, "ses_1")
        done = await store.change_session(ENV, "ses_1", report("check", "ok"))
        assert done.outcome is SessionOutcome.REJECTED  # the graph as published, not the rolled-back one

    run(tmp_path, body)


def test_a_write_whose_caller_went_away_before_its_batch_began_is_not_made(tmp_path: Path) -> None:
    """A call cut off by its deadline while another process held the write lock was committed once the
    lock was free: a retried abort (no request_id) then answered SESSION_TERMINAL for a call whose
    first attempt the caller saw fail."""

    async def body(store: Store, rec: Recorder) -> None:
        flow = await published_flow(store)
        await create(store, flow.flow_id, "ses_1")
        with write_lock_held(store.path):
            gone = asyncio.ensure_future(store.change_session(ENV, "ses_1", abort()))
            await until(lambda: store.queued_writes == 1)
            gone.cancel()
        await create(store, flow.flow_id, "ses_2")  # the writer has been through the batch before it
        assert gone.cancelled()
        assert (await store.get_session(ENV, "ses_1")).status is SessionStatus.RUNNING
        assert (await store.change_session(ENV, "ses_1", abort())).status is SessionStatus.ABORTED

    run(tmp_path, body)


def test_a_corrupt_page_met_by_a_command_fails_the_batch_as_a_store_failure(tmp_path: Path) -> None:
    """sqlite3 raises DatabaseError itself, not OperationalError, for a corrupt page: it was taken for
    the command's own bug, answered INTERNAL, and the rest of the batch committed around it."""

    async def body(store: Store, rec: Recorder) -> None:
        w = store._writer
        assert w is not None
        flow = await published_flow(store)

        def corrupt(conn: sqlite3.Connection) -> None:
            raise sqlite3.DatabaseError("database disk image is malformed")

        results = await gathered_in_one_go(store, w.submit(corrupt), store.create_session(new_session(flow.flow_id, "ses_1"), None))
        assert all(isinstance(r, Unavailable) and r.reason == "STORE_UNAVAILABLE" for r in results), results
        assert rec.health[-1] is False
        with pytest.raises(NotFound):
            await store.get_session(ENV, "ses_1")

    run(tmp_path, body)


def test_a_commit_that_writes_nothing_does_not_show_a_full_disk_writable_again(tmp_path: Path) -> None:
    """On a full disk only the commits that write fail. A refused verb (or a replay, or an expiry pass with
    nothing due) commits nothing and succeeded, which turned health SERVING while every write still failed."""

    async def body(store: Store, rec: Recorder) -> None:
        w = store._writer
        assert w is not None and w._conn is not None
        flow = await published_flow(store)
        commit, baseline = w._commit, w._conn.total_changes

        def full_disk(conn: sqlite3.Connection) -> None:
            nonlocal baseline
            wrote, baseline = conn.total_changes != baseline, conn.total_changes
            if wrote:
                raise sqlite3.OperationalError("database or disk is full")
            commit(conn)

        w._commit = full_disk  # type: ignore[method-assign]
        with pytest.raises(Unavailable):
            await create(store, flow.flow_id, "ses_1")
        assert rec.health[-1] is False
        with pytest.raises(NotFound):  # committed, writing nothing
            await store.change_session(ENV, "ses_nope", abort())
        assert not store.writable and rec.health[-1] is False
        with pytest.raises(Unavailable):
            await create(store, flow.flow_id, "ses_1")
        w._commit = commit  # type: ignore[method-assign]  # room on the disk again
        assert (await create(store, flow.flow_id, "ses_1")).version == 1
        assert store.writable and rec.health[-1] is True

    run(tmp_path, body)


def commits_fail(w: writer.Writer, count: int) -> dict[str, int]:
    """The writer's next ``count`` COMMITs fail with an I/O error; then the disk is fine. Returns the
    count left (``["left"]``)."""
    commit = w._commit
    failures = {"left": count}

    def failing(conn: sqlite3.Connection) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        commit(conn)

    w._commit = failing  # type: ignore[method-assign]
    return failures


def test_health_comes_back_by_itself_once_a_failed_commit_is_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """After a failed commit, health stayed NOT_SERVING until some call wrote: with clients and load
    balancers that follow health sending none, for good. The writer writes by itself meanwhile (and
    its failing re-checks do not log a traceback each)."""

    async def body(store: Store, rec: Recorder) -> None:
        w = store._writer
        assert w is not None
        w._recheck_s = 0.01
        flow = await published_flow(store)
        failures = commits_fail(w, 3)  # the fault outlasts the call, then ends
        with pytest.raises(Unavailable):
            await create(store, flow.flow_id, "ses_1")
        assert rec.health[-1] is False
        await until(lambda: store.writable)  # no call in between
        assert rec.health == [False, True] and failures["left"] == 0
        assert len([r for r in caplog.records if r.exc_info]) == 1  # the call's failure, not the re-checks'

    run(tmp_path, body)


def test_health_comes_back_while_calls_that_write_nothing_keep_coming(tmp_path: Path) -> None:
    """Calls that write nothing (a refused change), more often than once per re-check interval, kept
    the re-check from ever running: health stayed NOT_SERVING on a store that was fine again."""

    async def body(store: Store, rec: Recorder) -> None:
        w = store._writer
        assert w is not None
        w._recheck_s = 0.2
        flow = await published_flow(store)
        commits_fail(w, 1)
        with pytest.raises(Unavailable):
            await create(store, flow.flow_id, "ses_1")
        assert not store.writable
        for _ in range(30):  # 1.5 s of calls every 50 ms, each committing nothing
            with pytest.raises(NotFound):
                await store.change_session(ENV, "ses_nope", abort())
            await asyncio.sleep(0.05)  # paces the calls; not synchronisation
        assert store.writable and rec.health[-1] is True

    run(tmp_path, body)


def test_checkpoints_copy_the_wal_into_the_database_file_outside_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's automatic checkpoint runs inside COMMIT, which runs on the loop: it is off, and the disk
    thread checkpoints instead. Without that, the database file would never get the committed pages and
    the WAL would grow without end."""
    monkeypatch.setattr(writer, "CHECKPOINT_COMMITS", 8)

    async def body(store: Store, rec: Recorder) -> None:
        w = store._writer
        assert w is not None and w._conn is not None
        assert w._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        flow = await published_flow(store)
        for i in range(10):
            await create(store, flow.flow_id, f"ses_{i}")
        async with asyncio.timeout(DEADLINE_S):
            while w.checkpoints == 0:
                await asyncio.sleep(0.01)  # polls a condition under a deadline
        # The database file alone (without its WAL) now holds what was committed before the checkpoint.
        alone = tmp_path / "alone.db"
        shutil.copyfile(db(tmp_path), alone)
        copy = sqlite3.connect(alone)
        try:
            assert copy.execute("SELECT count(*) FROM sessions").fetchone()[0] >= 5
        finally:
            copy.close()

    run(tmp_path, body)


def test_while_the_wal_is_long_the_writer_checkpoints_after_every_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The WAL starts over only after a checkpoint copied all of it before the next commit. With another
    process appending all the time, a checkpoint every 100 commits seldom did (with two servers the WAL
    reached 253 MB in a minute), so while it is long the writer checkpoints after every batch, and goes
    back to every 100 commits once it started over. A reader holding an old snapshot keeps it long here."""
    monkeypatch.setattr(writer, "CHECKPOINT_FRAMES", 10)
    path = db(tmp_path)

    async def body(store: Store, rec: Recorder) -> None:
        w = store._writer
        assert w is not None
        flow = await published_flow(store)
        await create(store, flow.flow_id, "ses_1")
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM sessions").fetchall()  # a snapshot the checkpoint cannot pass
        try:
            while w.checkpoints == 0:
                assert w.commits_on_loop + w.commits_on_disk <= writer.CHECKPOINT_COMMITS + 5
                await store.change_session(ENV, "ses_1", report("check", "retry"))
            assert w._wal_frames > writer.CHECKPOINT_FRAMES
            for n in range(1, 6):
                await store.change_session(ENV, "ses_1", report("check", "retry"))
                assert w.checkpoints == 1 + n  # one after each batch
        finally:
            reader.execute("COMMIT")
            reader.close()
        for _ in range(3):  # copies everything now; the next commit starts the WAL over
            await store.change_session(ENV, "ses_1", report("check", "retry"))
        assert w._wal_frames <= writer.CHECKPOINT_FRAMES
        checkpoints = w.checkpoints
        for _ in range(5):
            await store.change_session(ENV, "ses_1", report("check", "retry"))
        assert w.checkpoints == checkpoints  # back to one every CHECKPOINT_COMMITS

    run(tmp_path, body)


@pytest.mark.parametrize("how", ["removed", "moved"])
def test_writes_are_refused_once_the_database_file_is_no_longer_at_its_path(tmp_path: Path, how: str) -> None:
    """SQLite in WAL mode would go on committing into the unlinked (or moved) file: every answered write lost."""

    elsewhere = str(tmp_path / "elsewhere.db")

    async def body(store: Store, rec: Recorder) -> None:
        flow = await published_flow(store)
        for suffix in ("", "-wal", "-shm"):
            if how == "removed":
                os.remove(db(tmp_path) + suffix)
            else:
                os.rename(db(tmp_path) + suffix, elsewhere + suffix)
        with pytest.raises(Unavailable) as info:
            await create(store, flow.flow_id, "ses_1")
        assert info.value.reason == "STORE_UNAVAILABLE" and "restart" in str(info.value)
        assert rec.health[-1] is False and not store.writable
        assert [e.session_id for e in rec.events if e.session_id == "ses_1"] == []  # nothing published
        for _ in range(8):  # reads on every reader thread: a gone file fails them, never comes back empty
            with contextlib.suppress(Unavailable):
                await store.get_flow(flow.flow_id)
        assert not os.path.exists(db(tmp_path))
        if how == "moved":
            with contextlib.closing(sqlite3.connect(elsewhere)) as moved:  # rolled back, not committed there
                assert moved.execute("SELECT count(*) FROM sessions").fetchone()[0] == 0
            for suffix in ("", "-wal", "-shm"):
                os.rename(elsewhere + suffix, db(tmp_path) + suffix)
            with pytest.raises(Unavailable):  # refused until a restart, not only while it is away
                await create(store, flow.flow_id, "ses_2")

    run(tmp_path, body)


def test_a_database_file_that_cannot_be_checked_for_a_while_is_not_taken_for_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stat of the path failing otherwise than "not there" (its directory chmod-ed for a moment) refused
    every write until a restart, as for a file moved away, although the file never moved."""
    real_stat = os.stat
    denied = {"on": False}

    def stat(path: Any, *args: Any, **kwargs: Any) -> Any:
        if denied["on"] and os.fspath(path) == db(tmp_path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_stat(path, *args, **kwargs)

    async def body(store: Store, rec: Recorder) -> None:
        flow = await published_flow(store)
        monkeypatch.setattr(writer.os, "stat", stat)
        denied["on"] = True
        with pytest.raises(Unavailable) as info:
            await create(store, flow.flow_id, "ses_1")
        assert info.value.reason == "STORE_UNAVAILABLE" and rec.health[-1] is False
        assert [e for e in rec.events if e.session_id == "ses_1"] == []  # rolled back, nothing published
        denied["on"] = False
        assert (await create(store, flow.flow_id, "ses_1")).version == 1
        assert store.writable and rec.health[-1] is True

    run(tmp_path, body)


def test_writes_are_refused_once_the_wal_is_removed_and_what_it_held_is_saved(tmp_path: Path) -> None:
    """SQLite goes on committing into a removed -wal as into a removed database file, and a start does not
    find it: after a crash, every write answered since the last checkpoint was gone, also those answered
    after the removal."""
    crashed = tmp_path / "as-a-restart-after-kill-9-finds-it.db"

    async def body(store: Store, rec: Recorder) -> None:
        flow = await published_flow(store)
        await create(store, flow.flow_id, "ses_1")  # in the -wal only: no checkpoint yet
        os.remove(db(tmp_path) + "-wal")
        with pytest.raises(Unavailable) as info:
            await create(store, flow.flow_id, "ses_2")
        assert info.value.reason == "STORE_UNAVAILABLE" and "restart" in str(info.value)
        assert rec.health[-1] is False and not store.writable
        shutil.copyfile(db(tmp_path), crashed)  # the database file alone, before any close could save it

    run(tmp_path, body)
    with contextlib.closing(sqlite3.connect(crashed)) as conn:
        assert [r[0] for r in conn.execute("SELECT session_id FROM sessions")] == ["ses_1"]


def test_a_chdir_does_not_look_like_a_moved_database_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = "flowsession.db"

    async def body(store: Store, _rec: Recorder) -> None:
        flow = await published_flow(store)
        monkeypatch.chdir(tmp_path.parent)
        assert (await create(store, flow.flow_id, "ses_1")).version == 1

    asyncio.run(with_store(relative, FakeClock(T0), body))


def test_an_unexpected_error_in_a_batch_refuses_its_calls_and_the_writer_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_commit_batch = writer.Writer._commit_batch
    broken = {"once": True}

    async def commit_batch(self: writer.Writer, batch: Any) -> None:
        if broken.pop("once", False):
            assert self._conn is not None
            self._conn.execute("BEGIN IMMEDIATE")  # fail with the transaction open: it must be rolled back
            raise RuntimeError("a bug in the writer")
        await real_commit_batch(self, batch)

    monkeypatch.setattr(writer.Writer, "_commit_batch", commit_batch)

    async def body(store: Store, rec: Recorder) -> None:
        with pytest.raises(Unavailable) as info:
            await store.create_flow("kyc", "identity check")
        assert info.value.reason == "STORE_UNAVAILABLE"
        flow = await published_flow(store)  # the writer still runs, outside any leftover transaction
        assert (await create(store, flow.flow_id, "ses_1")).version == 1

    run(tmp_path, body)


def test_callers_hear_back_even_if_on_commit_raises(tmp_path: Path) -> None:
    class FailingOnce(Recorder):
        armed = False

        def on_commit(self, events: list[SessionEvent]) -> None:
            super().on_commit(events)
            if self.armed:
                self.armed = False
                raise RuntimeError("a watcher callback failed")

    recorder = FailingOnce()

    async def body(store: Store, rec: Recorder) -> None:
        flow = await published_flow(store)
        recorder.armed = True
        # Bounded: were the callers never told, this would hang.
        session, _ = await asyncio.wait_for(store.create_session(new_session(flow.flow_id, "ses_1"), None), 1.0)
        assert session.version == 1
        assert (await store.get_session(ENV, "ses_1")).version == 1

    asyncio.run(with_store(db(tmp_path), FakeClock(T0), body, recorder))


def test_processes_opening_a_new_file_together_migrate_it_once(tmp_path: Path) -> None:
    """Several openers racing on one fresh file: every one succeeds and all share the same keys."""
    path = str(tmp_path / "race.db")
    barrier = threading.Barrier(6)
    keys: list[dict[str, str]] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            barrier.wait(DEADLINE_S)
            conn = schema.connect(path)
            try:
                schema.migrate(conn)
                keys.append(schema.read_meta(conn))
            finally:
                conn.close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S)
    assert errors == []
    assert len(keys) == 6 and all(k == keys[0] for k in keys)


def _prune_floor(path: str) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("SELECT value FROM meta WHERE key = 'prune_floor_us'").fetchone()[0])


def test_retention_passes_start_at_a_floor_that_never_skips_a_running_sessions_history(tmp_path: Path) -> None:
    """Later passes read events only from a floor up, so that the latest events every ended session
    keeps are not read again and again. The floor stays at the oldest RUNNING session's creation:
    its history becomes prunable when it ends, however old it is by then."""
    clock = FakeClock(T0)
    week = timedelta(days=7)

    async def body(store: Store, _rec: Recorder) -> None:
        flow = await published_flow(store, timeout=timedelta(days=30))
        await create(store, flow.flow_id, "ses_done")
        await store.change_session(ENV, "ses_done", abort())
        await create(store, flow.flow_id, "ses_long")
        await store.change_session(ENV, "ses_long", report("check", "retry"))
        clock.advance(timedelta(days=8))
        assert (await store.prune_events(week)).removed == 1  # ses_done's first event; ses_long is RUNNING
        # Held back by ses_long, not raised to the cutoff (less the slack for clocks that disagree).
        assert _prune_floor(store.path) == codec.to_us(T0) - commands.CLOCK_SLACK_US
        await store.change_session(ENV, "ses_long", abort())
        clock.advance(timedelta(days=1))
        assert (await store.prune_events(week)).removed == 2  # ses_long's history, older than the last cutoff
        assert [e.version for e in await store.events_after("ses_long", 0)] == [3]
        assert [e.version for e in await store.events_after("ses_done", 0)] == [2]
        assert _prune_floor(store.path) == codec.to_us(clock.now() - week) - commands.CLOCK_SLACK_US  # nothing RUNNING
        assert (await store.prune_events(week)).removed == 0

    run(tmp_path, body, clock)


def test_a_shutdown_deadline_ends_a_wait_for_another_process_lock_and_writes_nothing(tmp_path: Path) -> None:
    """A stopping server must answer a write stuck behind another process's lock before its grace
    ends: gRPC would cancel the call, and the write would land once the lock came free."""

    async def body(store: Store, rec: Recorder) -> None:
        flow = await published_flow(store)
        with write_lock_held(db(tmp_path)):
            pending = asyncio.ensure_future(store.create_session(new_session(flow.flow_id, "ses_1"), None))
            await until(lambda: store.queued_writes == 1)
            store.stop_waiting_by(time.monotonic())
            with pytest.raises(Unavailable) as info:
                await asyncio.wait_for(pending, DEADLINE_S)  # not the 30 s lock wait
            assert info.value.reason == "SHUTTING_DOWN" and info.value.retry_after
            assert store.writable and False not in rec.health  # the store is fine: the server is stopping
        with pytest.raises(NotFound):
            await store.get_session(ENV, "ses_1")

    run(tmp_path, body)


def test_retention_prunes_a_sessions_versions_oldest_first_whatever_their_times(tmp_path: Path) -> None:
    """A version stamped before the one before it (a process whose clock is 2 s behind, a clock stepped
    back) was pruned while that one was kept: a hole in the versions, which a WatchSession resumed from
    before it skipped. A version goes only once every earlier one of its session is due too."""
    clock, behind = FakeClock(T0), FakeClock(T0 - timedelta(seconds=2))
    week = timedelta(days=7)

    async def body(store: Store, _rec: Recorder) -> None:
        other = Store(store.path, behind)  # another process on the file
        await other.open(Recorder().on_commit, Recorder().on_health)
        try:
            flow = await published_flow(store, timeout=timedelta(days=30))
            await create(store, flow.flow_id, "ses_1")  # v1 at T0
            for c in (clock, behind):
                c.advance(timedelta(seconds=1))
            await store.change_session(ENV, "ses_1", report("check", "retry"))  # v2 at T0 + 1 s
            await other.change_session(ENV, "ses_1", report("check", "retry"))  # v3 at T0 - 1 s
            await store.change_session(ENV, "ses_1", report("check", "ok"))  # v4, COMPLETED
            for c in (clock, behind):
                c.advance(week)  # the cutoff is T0 + 1 s: v1 and v3 are due, v2 is not
            assert (await store.prune_events(week)).removed == 1  # v1 only: v3 waits for v2
            assert [e.version for e in await store.events_after("ses_1", 0)] == [2, 3, 4]
            clock.advance(timedelta(seconds=1))
            assert (await store.prune_events(week)).removed == 2
            assert [e.version for e in await store.events_after("ses_1", 0)] == [4]
        finally:
            await other.close()

    run(tmp_path, body, clock)


@pytest.mark.parametrize("clock_trouble", ["ahead_for_one_pass", "stepped_back_past_retention", "behind_the_creator"])
def test_retention_still_prunes_everything_due_when_clocks_misbehave(tmp_path: Path, clock_trouble: str) -> None:
    """The floor comes from clock readings: a pass by a clock a year ahead, a clock stepped back by
    more than the retention period (NTP), and a step reported by a process whose clock is 2 s behind
    the one that created the session must not leave history unpruned for good."""
    clock = FakeClock(T0)
    week = timedelta(days=7)

    async def body(store: Store, _rec: Recorder) -> None:
        flow = await published_flow(store, timeout=timedelta(days=30))
        if clock_trouble == "ahead_for_one_pass":
            clock.advance(timedelta(days=365))
            await store.prune_events(week)
            clock.advance(-timedelta(days=365))
        elif clock_trouble == "stepped_back_past_retention":
            await store.prune_events(week)
            clock.advance(-timedelta(days=10))
        await create(store, flow.flow_id, "ses_1")
        if clock_trouble == "behind_the_creator":
            clock.advance(-timedelta(seconds=2))
            await store.change_session(ENV, "ses_1", report("check", "retry"))
            clock.advance(timedelta(seconds=2) + timedelta(days=8))
            await store.prune_events(week)  # ses_1 RUNNING: the floor stays at its creation
        else:
            await store.change_session(ENV, "ses_1", report("check", "retry"))
        await store.change_session(ENV, "ses_1", abort())
        clock.advance(timedelta(days=30))
        if clock_trouble == "stepped_back_past_retention":
            # Stamped below the floor: only the daily pass from the start finds them.
            assert (await store.prune_events(week)).removed == 0
            assert (await store.prune_events(week, from_us=0)).removed == 2
        else:
            assert (await store.prune_events(week)).removed == 2
        assert [e.version for e in await store.events_after("ses_1", 0)] == [3]

    run(tmp_path, body, clock)


def test_retention_reads_the_whole_history_on_its_first_pass_and_once_a_day() -> None:
    calls: list[int | None] = []

    class Pruning:
        async def prune_events(self, retention: timedelta, *, from_us: int | None = None) -> commands.Pruned:
            calls.append(from_us)
            if len(calls) == 1:  # the first pass fails: the next one must still read everything
                raise Unavailable("the store could not be read: disk I/O error", reason="STORE_UNAVAILABLE")
            # Then one pass takes two calls: the second goes on from where the first got to.
            return commands.Pruned(5000, 777) if len(calls) == 2 else commands.Pruned(0, 0)

    loop = Retention(Pruning(), timedelta(days=7))  # type: ignore[arg-type]  # a pass every 10 minutes
    with pytest.raises(Unavailable):
        asyncio.run(loop.prune())
    for _ in range(145):
        asyncio.run(loop.prune())
    # Call 0 fails; the next pass reads from 0, goes on from 777, then from the floor (call 3); every
    # pass after it one call from the floor, until the 144th pass after the first reads from 0 again.
    assert [(i, at) for i, at in enumerate(calls) if at is not None] == [(0, 0), (1, 0), (2, 777), (147, 0)]
    assert calls[3] is None and len(calls) == 149


def test_a_pass_from_the_start_goes_on_from_where_each_call_got_to(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    week = timedelta(days=7)

    async def body(store: Store, _rec: Recorder) -> None:
        flow = await published_flow(store)
        for n in range(3):
            await create(store, flow.flow_id, f"ses_{n}")
            await store.change_session(ENV, f"ses_{n}", report("check", "retry"))
            await store.change_session(ENV, f"ses_{n}", abort())
            clock.advance(timedelta(seconds=1))
        clock.advance(timedelta(days=8))
        removed, at, calls = 0, 0, 0
        while True:
            pruned = await store.prune_events(week, limit=2, from_us=at)
            calls += 1
            removed += pruned.removed
            if pruned.removed == 0:
                break
            assert pruned.through_us >= at  # never back to the start
            at = pruned.through_us
        assert (removed, calls) == (6, 4)
        for n in range(3):
            assert [e.version for e in await store.events_after(f"ses_{n}", 0)] == [3]

    run(tmp_path, body, clock)
