"""Write commands, run by the writer inside its transaction.

Each reads the rows it decides on within the same write transaction, so the domain decides on the
state that is committed over; the guarded UPDATE (``WHERE version = ?``) still catches a lost race.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Callable, Mapping

from ..domain import lifecycle
from ..domain.errors import AlreadyExists, FailedPrecondition, NotFound, VersionMismatch
from ..domain.model import (
    Flow,
    FlowGraph,
    FlowVersion,
    FlowVersionState,
    Session,
    SessionEvent,
)
from . import codec, reads
from .writer import Command, Done

# Decides a session's next state: (session, its flow version, now) -> the event recording the change.
Verb = Callable[[Session, FlowVersion, datetime], SessionEvent]


@dataclass(frozen=True)
class IdempotencyKey:
    scope: str
    request_id: str
    fingerprint: str


@dataclass(frozen=True)
class NewSession:
    session_id: str
    flow_id: str
    environment: str
    input: Mapping[str, Any]
    metadata: Mapping[str, str]
    redirect_url: str
    state: str


def create_flow(flow_id: str, name: str, description: str, now: datetime) -> Command:
    def run(conn: sqlite3.Connection) -> Done[Flow]:
        us = codec.to_us(now)
        conn.execute(
            "INSERT INTO flows (flow_id, name, description, create_us, update_us, latest_version) VALUES (?,?,?,?,?,0)",
            [flow_id, name, description, us, us],
        )
        return Done(Flow(flow_id, name, description, now, now))

    return run


def create_flow_version(flow_id: str, graph: FlowGraph, timeout: timedelta, now: datetime) -> Command:
    def run(conn: sqlite3.Connection) -> Done[FlowVersion]:
        flow = _flow(conn, flow_id)
        version = flow.latest_version + 1
        us = codec.to_us(now)
        conn.execute(
            "INSERT INTO flow_versions (flow_id, version, state, graph, timeout_us, create_us, update_us) VALUES (?,?,?,?,?,?,?)",
            [flow_id, version, FlowVersionState.DRAFT.value, codec.graph_to_json(graph), timeout // timedelta(microseconds=1), us, us],
        )
        conn.execute("UPDATE flows SET latest_version = ?, update_us = ? WHERE flow_id = ?", [version, us, flow_id])
        return Done(FlowVersion(flow_id, version, FlowVersionState.DRAFT, graph, timeout, now, now))

    return run


def update_flow_version(flow_id: str, version: int, graph: FlowGraph, timeout: timedelta, now: datetime) -> Command:
    def run(conn: sqlite3.Connection) -> Done[FlowVersion]:
        current = _flow_version(conn, flow_id, version)
        if current.state is FlowVersionState.PUBLISHED:
            raise FailedPrecondition(
                f"flow {flow_id} version {version} is published and immutable; create a new version",
                reason="FLOW_VERSION_PUBLISHED",
            )
        conn.execute(
            "UPDATE flow_versions SET graph = ?, timeout_us = ?, update_us = ? WHERE flow_id = ? AND version = ?",
            [codec.graph_to_json(graph), timeout // timedelta(microseconds=1), codec.to_us(now), flow_id, version],
        )
        return Done(replace(current, graph=graph, execution_timeout=timeout, update_time=now))

    return run


def publish_flow_version(flow_id: str, version: int, environment: str, now: datetime) -> Command:
    def run(conn: sqlite3.Connection) -> Done[tuple[FlowVersion, Flow]]:
        current = _flow_version(conn, flow_id, version)
        us = codec.to_us(now)
        if current.state is FlowVersionState.DRAFT:
            conn.execute(
                "UPDATE flow_versions SET state = ?, publish_us = ?, update_us = ? WHERE flow_id = ? AND version = ?",
                [FlowVersionState.PUBLISHED.value, us, us, flow_id, version],
            )
        conn.execute(
            "INSERT INTO publications (flow_id, environment, version, publish_us) VALUES (?,?,?,?) "
            "ON CONFLICT (flow_id, environment) DO UPDATE SET version = excluded.version, publish_us = excluded.publish_us",
            [flow_id, environment, version, us],
        )
        conn.execute("UPDATE flows SET update_us = ? WHERE flow_id = ?", [us, flow_id])
        return Done((_flow_version(conn, flow_id, version), _flow(conn, flow_id)))

    return run


def create_session(new: NewSession, idempotency: IdempotencyKey | None, now: datetime) -> Command:
    """Value: (session, replayed). A replay returns the session as the first call answered it (see
    ``_replayed`` for one past its deadline)."""

    def run(conn: sqlite3.Connection) -> Done[tuple[Session, bool]]:
        if idempotency is not None:
            earlier = _replay(conn, idempotency)
            if earlier is not None:
                done = _replayed(conn, earlier, _session(conn, new.environment, earlier.session_id), now)
                return Done((done.value, True), done.events)
        flow = _flow(conn, new.flow_id)
        published = flow.published_versions.get(new.environment)
        if published is None:
            raise FailedPrecondition(
                f"flow {new.flow_id} has no version published to {new.environment!r}",
                reason="FLOW_NOT_PUBLISHED",
                metadata={"flow_id": new.flow_id, "environment": new.environment},
            )
        event = lifecycle.start(
            session_id=new.session_id,
            flow_version=_flow_version(conn, new.flow_id, published),
            environment=new.environment,
            input=new.input,
            metadata=new.metadata,
            redirect_url=new.redirect_url,
            state=new.state,
            now=now,
        )
        s = event.session
        body = codec.session_body(s)
        conn.execute(
            "INSERT INTO sessions (session_id, environment, flow_id, status, create_us, expire_us, version, input, body) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            [
                s.session_id, s.environment, s.flow_id, s.status.value, codec.to_us(s.create_time),
                codec.to_us(s.expire_time), s.version, codec.dumps(s.input), body,
            ],
        )
        event = _append_event(conn, event, body)
        if idempotency is not None:
            _remember(conn, idempotency, s, now)
        return Done((s, False), [event])

    return run


class PublishedVersions:
    """Published flow versions are immutable, so the writer keeps the ones sessions run. One is read
    inside the writer's transaction: should that be rolled back as a whole, ``forget`` them all."""

    def __init__(self, capacity: int = 10_000):
        self._capacity = capacity
        self._versions: dict[tuple[str, int], FlowVersion] = {}

    def forget(self) -> None:
        """The writer rolled a batch back: a version read as published in it may be a draft again."""
        self._versions.clear()

    def get(self, conn: sqlite3.Connection, flow_id: str, version: int) -> FlowVersion:
        key = (flow_id, version)
        found = self._versions.get(key)
        if found is None:
            found = _flow_version(conn, flow_id, version)
            if found.state is FlowVersionState.PUBLISHED:
                if len(self._versions) >= self._capacity:
                    self._versions.clear()
                self._versions[key] = found
        return found


def change_session(
    environment: str,
    session_id: str,
    verb: Verb,
    now: datetime,
    idempotency: IdempotencyKey | None,
    versions: PublishedVersions,
) -> Command:
    """Applies ``verb`` to a session. An overdue RUNNING session is expired first (and that expiry is
    committed even when the verb is then refused), so no change lands after a session's deadline."""

    def run(conn: sqlite3.Connection) -> Done[Session]:
        session = _session(conn, environment, session_id)
        if idempotency is not None:
            earlier = _replay(conn, idempotency)
            if earlier is not None:
                return _replayed(conn, earlier, session, now)
        events: list[SessionEvent] = []
        if lifecycle.is_overdue(session, now):
            expired = _apply(conn, session, lifecycle.expire(session, now=now))
            events.append(expired)
            session = expired.session
        try:
            flow_version = versions.get(conn, session.flow_id, session.flow_version)
            event = _apply(conn, session, verb(session, flow_version, now))
        except (FailedPrecondition, VersionMismatch) as refused:
            if events:
                return Done(session, events, error=refused)
            raise
        if idempotency is not None:
            _remember(conn, idempotency, event.session, now)
        return Done(event.session, [*events, event])

    return run


def expire_session(environment: str, session_id: str, now: datetime) -> Command:
    """Expires one overdue session (a read found it past its deadline); value: the session as it stands."""

    def run(conn: sqlite3.Connection) -> Done[Session]:
        session = _session(conn, environment, session_id)
        if not lifecycle.is_overdue(session, now):
            return Done(session)
        event = _apply(conn, session, lifecycle.expire(session, now=now))
        return Done(event.session, [event])

    return run


def expire_sessions(environment: str, session_ids: list[str], now: datetime) -> Command:
    """Expires those of these sessions that are overdue (a listing found them past their deadline)."""

    def run(conn: sqlite3.Connection) -> Done[int]:
        events = []
        for session_id in session_ids:
            session = _session(conn, environment, session_id)
            if lifecycle.is_overdue(session, now):
                events.append(_apply(conn, session, lifecycle.expire(session, now=now)))
        return Done(len(events), events)

    return run


def expire_due(limit: int, now: datetime) -> Command:
    """Expires up to ``limit`` sessions whose deadline is at or before ``now``; value: how many."""

    def run(conn: sqlite3.Connection) -> Done[int]:
        events = []
        for session in reads.due_sessions(conn, codec.to_us(now), limit):
            events.append(_apply(conn, session, lifecycle.expire(session, now=now)))
        return Done(len(events), events)

    return run


def _apply(conn: sqlite3.Connection, before: Session, event: SessionEvent) -> SessionEvent:
    after = event.session
    body = codec.session_body(after)
    cur = conn.execute(
        "UPDATE sessions SET status = ?, version = ?, body = ? WHERE session_id = ? AND version = ?",
        [after.status.value, after.version, body, after.session_id, before.version],
    )
    if cur.rowcount != 1:  # not with one writer per transaction (BEGIN IMMEDIATE); still said as documented
        row = conn.execute("SELECT version FROM sessions WHERE session_id = ?", [after.session_id]).fetchone()
        raise VersionMismatch(
            f"session {after.session_id} changed concurrently; re-read it and decide again",
            metadata={"version": str(row["version"] if row else before.version)},
        )
    return _append_event(conn, event, body)


def _append_event(conn: sqlite3.Connection, event: SessionEvent, body: str) -> SessionEvent:
    s = event.session
    event_us = codec.to_us(event.event_time)
    cur = conn.execute(
        "INSERT INTO events (session_id, version, type, event_us, environment, flow_id, status, body) VALUES (?,?,?,?,?,?,?,?)",
        [event.session_id, event.version, event.type.value, event_us, s.environment, s.flow_id, s.status.value, body],
    )
    return replace(event, cursor=cur.lastrowid or 0, tag=codec.event_tag(event.session_id, event.version, event_us))


def _replay(conn: sqlite3.Connection, key: IdempotencyKey) -> Session | None:
    row = conn.execute(
        "SELECT fingerprint, session_id, response FROM request_ids WHERE scope = ? AND request_id = ?",
        [key.scope, key.request_id],
    ).fetchone()
    if row is None:
        return None
    if row["fingerprint"] != key.fingerprint:
        raise AlreadyExists(
            f"request_id {key.request_id!r} was already used with a different request",
            reason="REQUEST_ID_REUSED",
            metadata={"request_id": key.request_id, "session_id": row["session_id"]},
        )
    response = json.loads(row["response"])
    return codec.session_from_body(row["session_id"], response["body"], response["input"])


def _replayed(conn: sqlite3.Connection, earlier: Session, current: Session, now: datetime) -> Done[Session]:
    """A retried call's answer: the first call's, unless that said RUNNING and the deadline has passed
    since. No answer says RUNNING past expire_time, so the session is answered as it stands now,
    expired first (with its event) if nothing else ended it."""
    if not lifecycle.is_overdue(earlier, now):
        return Done(earlier)
    if lifecycle.is_overdue(current, now):
        event = _apply(conn, current, lifecycle.expire(current, now=now))
        return Done(event.session, [event])
    return Done(current)


def _remember(conn: sqlite3.Connection, key: IdempotencyKey, session: Session, now: datetime) -> None:
    response = codec.dumps({"body": codec.session_body(session), "input": codec.dumps(session.input)})
    conn.execute(
        "INSERT INTO request_ids (scope, request_id, fingerprint, session_id, response, create_us) VALUES (?,?,?,?,?,?)",
        [key.scope, key.request_id, key.fingerprint, session.session_id, response, codec.to_us(now)],
    )


def _flow(conn: sqlite3.Connection, flow_id: str) -> Flow:
    flow = reads.get_flow(conn, flow_id)
    if flow is None:
        raise NotFound(f"flow {flow_id} not found", reason="FLOW_NOT_FOUND", metadata={"flow_id": flow_id})
    return flow


def _flow_version(conn: sqlite3.Connection, flow_id: str, version: int) -> FlowVersion:
    found = reads.get_flow_version(conn, flow_id, version)
    if found is None:
        _flow(conn, flow_id)
        raise NotFound(
            f"flow {flow_id} has no version {version}",
            reason="FLOW_VERSION_NOT_FOUND",
            metadata={"flow_id": flow_id, "version": str(version)},
        )
    return found


def _session(conn: sqlite3.Connection, environment: str, session_id: str) -> Session:
    session = reads.get_session(conn, session_id)
    if session is None or session.environment != environment:
        raise not_found_session(environment, session_id)
    return session


def not_found_session(environment: str, session_id: str) -> NotFound:
    return NotFound(
        f"session {session_id} not found in environment {environment!r}",
        reason="SESSION_NOT_FOUND",
        metadata={"session_id": session_id, "environment": environment},
    )




# How far the clocks of the processes on one file may disagree before retention can miss an event.
CLOCK_SLACK_US = 3600 * 1_000_000


@dataclass(frozen=True)
class Pruned:
    removed: int
    through_us: int  # the scan got this far (event times): where a pass from the start goes on


def prune_events(limit: int, retention: timedelta, from_us: int | None, now: datetime) -> Command:
    """Deletes up to ``limit`` events older than ``retention``, never one of a RUNNING session and never
    a session's latest event (WatchSession starts from it), and the ended sessions' request ids older
    than that. Value: a Pruned.

    Every ended session keeps its latest event forever, so reading all old events on each pass would
    take longer with every session ever run. A pass that found everything due (fewer than ``limit``)
    sets a floor at its cutoff, or at the creation of the oldest RUNNING session if earlier, less
    CLOCK_SLACK_US: below it, what is left is latest events of ended sessions, which stay, and later
    passes start there. The slack covers clocks of processes that disagree (an event stamped before
    its session's creation); a floor above the cutoff (a clock that went back, or ran ahead for one
    pass) is dropped, and that pass reads everything, as does one given ``from_us`` (Retention runs
    one from 0 a day, for events a clock stepped back stamped below the floor, each call going on
    from the ``through_us`` of the one before)."""

    def run(conn: sqlite3.Connection) -> Done[Pruned]:
        cutoff = codec.to_us(now - retention)
        kept = int(conn.execute("SELECT value FROM meta WHERE key = 'prune_floor_us'").fetchone()["value"])
        floor = from_us if from_us is not None else kept if kept <= cutoff else 0
        # Only while every earlier version of the session is due too: a later version stamped before an
        # earlier one (two processes' clocks apart, or a clock stepped back) would leave a hole in the
        # versions otherwise, which a WatchSession resumed from before it would have to refuse.
        rows = conn.execute(
            "SELECT e.cursor, e.session_id, e.version, e.event_us FROM events e JOIN sessions s ON s.session_id = e.session_id "
            "WHERE e.event_us >= ? AND e.event_us < ? AND s.status != 'RUNNING' AND e.version < s.version "
            "AND NOT EXISTS (SELECT 1 FROM events o WHERE o.session_id = e.session_id AND o.version < e.version "
            "AND o.event_us >= ?) "
            "ORDER BY e.event_us LIMIT ?",
            [floor, cutoff, cutoff, limit],
        ).fetchall()
        cursors = [r["cursor"] for r in rows]
        # Idempotency keys live as long as history: kept while the session runs and for the retention
        # period after it ended (its latest event, never pruned, is the end), so a retry within that is
        # recognised. Those left older than the cutoff are of sessions that ran or ended since, so the
        # range stays short.
        conn.execute(
            "DELETE FROM request_ids WHERE create_us < ? AND NOT EXISTS "
            "(SELECT 1 FROM sessions s WHERE s.session_id = request_ids.session_id AND (s.status = 'RUNNING' OR "
            "EXISTS (SELECT 1 FROM events e WHERE e.session_id = s.session_id AND e.version = s.version AND e.event_us >= ?)))",
            [cutoff, cutoff],
        )
        if cursors:
            conn.executemany("DELETE FROM events WHERE cursor = ?", [[c] for c in cursors])
            top = max(rows, key=lambda r: r["cursor"])
            if top["cursor"] > reads.pruned_through(conn):
                # The oldest resumable position is the newest pruned event: keep its tag to verify it by.
                conn.execute("UPDATE meta SET value = ? WHERE key = 'pruned_through'", [str(top["cursor"])])
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('pruned_tag', ?)",
                    [codec.event_tag(top["session_id"], top["version"], top["event_us"])],
                )
        # Only a call that read everything from its floor up in one snapshot may set the floor: one
        # going on from an earlier call can miss a session that ended in between.
        if len(rows) < limit and not from_us:
            # A RUNNING session's events follow its creation (give or take the slack), and an ended
            # session never changes.
            oldest = conn.execute("SELECT MIN(create_us) AS us FROM sessions WHERE status = 'RUNNING'").fetchone()["us"]
            new_floor = max(0, (cutoff if oldest is None else min(cutoff, oldest)) - CLOCK_SLACK_US)
            if new_floor != kept:
                conn.execute("UPDATE meta SET value = ? WHERE key = 'prune_floor_us'", [str(new_floor)])
        return Done(Pruned(len(cursors), rows[-1]["event_us"] if rows else floor))

    return run
