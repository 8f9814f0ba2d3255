"""The store interface the server uses. This SQLite implementation pairs the single writer with pooled
readers; a PostgreSQL backend would implement the same async methods."""
from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable

from ..clock import Clock
from ..domain.errors import NotFound
from ..domain.model import Flow, FlowGraph, FlowVersion, LogPosition, Session, SessionEvent, SessionStatus
from . import codec, commands, reads, schema
from .commands import IdempotencyKey, NewSession, Verb
from .writer import Writer


@dataclass(frozen=True)
class StoreKeys:
    """Created with the database and shared by every process on it."""

    epoch: str
    token_key: bytes
    page_key: bytes


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class Store:
    def __init__(self, path: str, clock: Clock, *, synchronous: str = "FULL", read_threads: int = 4):
        self._path = os.path.abspath(path)  # connections opened later (readers) must not follow a chdir
        self._clock = clock
        self._synchronous = synchronous
        self._read_threads = read_threads
        self._writer: Writer | None = None
        self._reader: reads.Reader | None = None
        self._version_conn: sqlite3.Connection | None = None  # data_version() only, on the event loop
        self.keys: StoreKeys | None = None
        self._versions = commands.PublishedVersions()  # used by the writer's commands only

    async def open(self, on_commit: Callable[[list[SessionEvent]], None], on_health: Callable[[bool], None]) -> None:
        def prepare() -> StoreKeys:
            conn = schema.connect(self._path, synchronous=self._synchronous)
            try:
                schema.migrate(conn)
                meta = schema.read_meta(conn)
            finally:
                conn.close()
            return StoreKeys(meta["epoch"], bytes.fromhex(meta["token_key"]), bytes.fromhex(meta["page_key"]))

        self.keys = await asyncio.to_thread(prepare)
        self._version_conn = await asyncio.to_thread(_version_connection, self._path)
        self._reader = reads.Reader(self._path, threads=self._read_threads)
        self._writer = Writer(
            self._path,
            synchronous=self._synchronous,
            on_commit=on_commit,
            on_health=on_health,
            on_rollback=self._versions.forget,  # it may hold a version read as published in the batch
        )
        self._writer.start(asyncio.get_running_loop())

    @property
    def writable(self) -> bool:
        return self._writer is not None and self._writer.healthy

    def stop_waiting_by(self, deadline: float) -> None:
        """Writes waiting for another process's write lock at ``deadline`` (time.monotonic()) are
        refused with SHUTTING_DOWN."""
        if self._writer is not None:
            self._writer.stop_waiting_by(deadline)

    async def close(self) -> None:
        """Commits every write already accepted, then closes the connections."""
        if self._writer is not None:
            await self._writer.close()
        if self._reader is not None:
            await asyncio.to_thread(self._reader.close)
        if self._version_conn is not None:
            self._version_conn.close()

    async def _write(self, factory: Callable[..., Any], *args: Any) -> Any:
        # ``now`` is read when the command runs, so event times follow commit order.
        assert self._writer is not None
        return await self._writer.submit(lambda conn: factory(*args, self._clock.now())(conn))

    async def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._reader is not None
        return await self._reader.run(fn, *args)

    # flows

    async def create_flow(self, name: str, description: str) -> Flow:
        return await self._write(commands.create_flow, new_id("flw"), name, description)

    async def get_flow(self, flow_id: str) -> Flow:
        flow = await self._read(reads.get_flow, flow_id)
        if flow is None:
            raise NotFound(f"flow {flow_id} not found", reason="FLOW_NOT_FOUND", metadata={"flow_id": flow_id})
        return flow

    async def list_flows(self, after: list[Any] | None, limit: int) -> list[Flow]:
        """Oldest first, from just past ``after`` (a ``flow_position``)."""
        return await self._read(reads.list_flows, after, limit)

    @staticmethod
    def flow_position(flow: Flow) -> list[Any]:
        """Where ``flow`` stands in list_flows: the ``after`` that goes on past it."""
        return [codec.to_us(flow.create_time), flow.flow_id]

    async def create_flow_version(self, flow_id: str, graph: FlowGraph, timeout: timedelta) -> FlowVersion:
        return await self._write(commands.create_flow_version, flow_id, graph, timeout)

    async def update_flow_version(self, flow_id: str, version: int, graph: FlowGraph, timeout: timedelta) -> FlowVersion:
        return await self._write(commands.update_flow_version, flow_id, version, graph, timeout)

    async def publish_flow_version(self, flow_id: str, version: int, environment: str) -> tuple[FlowVersion, Flow]:
        return await self._write(commands.publish_flow_version, flow_id, version, environment)

    async def get_flow_version(self, flow_id: str, version: int) -> FlowVersion:
        found = await self._read(reads.get_flow_version, flow_id, version)
        if found is None:
            await self.get_flow(flow_id)
            raise NotFound(
                f"flow {flow_id} has no version {version}",
                reason="FLOW_VERSION_NOT_FOUND",
                metadata={"flow_id": flow_id, "version": str(version)},
            )
        return found

    async def list_flow_versions(self, flow_id: str, after_version: int, limit: int) -> list[FlowVersion]:
        await self.get_flow(flow_id)
        return await self._read(reads.list_flow_versions, flow_id, after_version, limit)

    # sessions

    async def create_session(self, new: NewSession, idempotency: IdempotencyKey | None) -> tuple[Session, bool]:
        return await self._write(commands.create_session, new, idempotency)

    async def change_session(
        self, environment: str, session_id: str, verb: Verb, idempotency: IdempotencyKey | None = None
    ) -> Session:
        return await self._write(
            lambda now: commands.change_session(environment, session_id, verb, now, idempotency, self._versions)
        )

    async def get_session(self, environment: str, session_id: str) -> Session:
        """Never answers RUNNING past the deadline: an overdue session is expired (and its event sent) first."""
        session = await self._read(reads.get_session, session_id)
        if session is None or session.environment != environment:
            raise commands.not_found_session(environment, session_id)
        if session.status is SessionStatus.RUNNING and self._clock.now() >= session.expire_time:
            session = await self._write(commands.expire_session, environment, session_id)
        return session

    async def list_sessions(
        self, environment: str, flow_id: str, statuses: Iterable[SessionStatus], after: list[Any] | None, limit: int
    ) -> list[Session]:
        """Newest first, from just past ``after`` (a ``session_position``). Never shows RUNNING past the
        deadline: the overdue sessions of the page are expired first, and the page is read again (with a
        RUNNING filter that brings in more of them, until a page has none)."""
        statuses = tuple(statuses)
        tried: set[str] = set()
        while True:
            found = await self._read(reads.list_sessions, environment, flow_id, statuses, after, limit)
            now = self._clock.now()
            overdue = [s.session_id for s in found if s.status is SessionStatus.RUNNING and now >= s.expire_time]
            # Each session is sent to the writer once: one still RUNNING after that was not overdue by the
            # writer's clock (it stepped back), so this read is the answer and the loop never spins. A
            # pass that expired none (the scheduler or another process was first) still reads again, and
            # expires what fell due meanwhile, rather than answer it RUNNING past its deadline.
            fresh = [sid for sid in overdue if sid not in tried]
            if not fresh:
                return found
            tried.update(fresh)
            await self._write(commands.expire_sessions, environment, fresh)

    @staticmethod
    def session_position(session: Session) -> list[Any]:
        """Where ``session`` stands in list_sessions: the ``after`` that goes on past it."""
        return [codec.to_us(session.create_time), session.session_id]

    async def events_after(self, session_id: str, after_version: int) -> list[SessionEvent]:
        return await self._read(reads.events_after, session_id, after_version)

    async def log_after(self, after_cursor: int, limit: int) -> tuple[LogPosition, list[SessionEvent]]:
        """The oldest resumable position and the log after ``after_cursor``, read in one snapshot."""
        return await self._read(reads.log_after, after_cursor, limit)

    async def environment_events(
        self, environment: str, flow_id: str, statuses: Iterable[SessionStatus], after_cursor: int, limit: int
    ) -> list[SessionEvent]:
        return await self._read(reads.environment_events, environment, flow_id, tuple(statuses), after_cursor, limit)

    async def current_events(
        self, environment: str, flow_id: str, after_cursor: int, up_to_cursor: int, limit: int
    ) -> list[SessionEvent]:
        return await self._read(reads.current_events, environment, flow_id, after_cursor, up_to_cursor, limit)

    async def max_cursor(self) -> int:
        return await self._read(reads.max_cursor)

    async def head(self) -> LogPosition:
        return await self._read(reads.head)

    async def log_bounds(self, cursor: int) -> tuple[LogPosition, LogPosition, LogPosition | None]:
        """The oldest resumable position, the head, and the position of the event at ``cursor`` if any."""
        return await self._read(reads.log_bounds, cursor)

    @property
    def path(self) -> str:
        return self._path

    @property
    def queued_writes(self) -> int:
        """Commands submitted to the writer and not yet answered."""
        return 0 if self._writer is None else self._writer.queued

    @property
    def publishing(self) -> tuple[int, int] | None:
        """The cursor range this process has committed and not yet handed to on_commit, if any."""
        return None if self._writer is None else self._writer.publishing

    def data_version(self) -> int | None:
        """SQLite's PRAGMA data_version: it changes once another connection (another process, or this
        one's writer) has committed, and only then, so the change feed reads the log only when it did.
        Cheap, and it never waits on a lock (busy_timeout 0), so it runs on the event loop. None when it
        could not be read (busy, I/O error): the feed then reads the log."""
        assert self._version_conn is not None
        try:
            # fetchall steps the statement to its end, which ends its read transaction: one left open
            # would pin the WAL and keep checkpoints from finishing.
            return int(self._version_conn.execute("PRAGMA data_version").fetchall()[0][0])
        except sqlite3.Error:
            return None

    async def oldest_position(self) -> LogPosition:
        return await self._read(reads.oldest_position)

    async def prune_events(self, retention: timedelta, *, limit: int = 5000, from_us: int | None = None) -> commands.Pruned:
        """One call of retention (see commands.prune_events): from the floor, or from ``from_us``."""
        return await self._write(commands.prune_events, limit, retention, from_us)

    async def next_expiry(self) -> datetime | None:
        due = await self._read(reads.next_expiry_us)
        return None if due is None else codec.from_us(due)

    async def expire_due(self, *, limit: int = 1000) -> int:
        return await self._write(commands.expire_due, limit)


def _version_connection(path: str) -> sqlite3.Connection:
    conn = schema.connect(path, create=False)
    conn.execute("PRAGMA busy_timeout=0")
    return conn
