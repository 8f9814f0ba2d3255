"""The single writer: one thread owns the write connection and commits commands in batches.

Group commit: every command waiting when the thread wakes runs in one transaction, each inside its own
SAVEPOINT so a failing command rolls back alone, and the batch costs one fsync. Callers await an asyncio
future; the event loop never blocks on SQLite. Committed events are handed to ``on_commit`` on the loop,
in commit order, before the callers' futures resolve.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

from ..domain.errors import DomainError, Unavailable
from ..domain.model import SessionEvent
from . import schema

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Done(Generic[T]):
    """What a command produced. ``error`` lets a command commit its writes yet fail the call
    (an overdue session is expired, then the caller's change is refused)."""

    value: T | None = None
    events: list[SessionEvent] = field(default_factory=list)
    error: DomainError | None = None


Command = Callable[[sqlite3.Connection], Done[Any]]


@dataclass
class _Job:
    command: Command
    future: asyncio.Future[Any]


_STOP = object()


class Writer:
    def __init__(
        self,
        path: str,
        *,
        synchronous: str,
        on_commit: Callable[[list[SessionEvent]], None],
        on_health: Callable[[bool], None],
        max_batch: int = 512,
    ):
        self._path = path
        self._synchronous = synchronous
        self._on_commit = on_commit
        self._on_health = on_health
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self.healthy = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        conn = schema.connect(self._path, synchronous=self._synchronous)
        self._thread = threading.Thread(target=self._run, args=(conn,), name="flowsession-writer", daemon=True)
        self.healthy = True
        self._thread.start()

    async def submit(self, command: Command) -> Any:
        """Runs ``command`` in the next batch; returns its value or raises its error."""
        if self._closing:
            raise Unavailable("the server is shutting down", reason="SHUTTING_DOWN")
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put(_Job(command, future))
        return await future

    async def close(self) -> None:
        """Refuses new commands, commits every queued one, then stops the thread."""
        self._closing = True
        self._queue.put(_STOP)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def _run(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                job = self._queue.get()
                if job is _STOP:
                    return
                batch = [job]
                stop_after = False
                while len(batch) < self._max_batch:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is _STOP:
                        stop_after = True
                        break
                    batch.append(more)
                self._commit_batch(conn, batch)
                if stop_after:
                    return
        finally:
            conn.close()

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        results: list[tuple[_Job, Done[Any] | BaseException]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                results.append((job, self._run_one(conn, job)))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.exception("commit failed; %d commands are refused", len(batch))
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._set_health(False)
            failure = Unavailable(f"the store could not commit: {exc}", reason="STORE_UNAVAILABLE", retry_after=1.0)
            self._deliver([(job, failure) for job in batch], [])
            return
        self._set_health(True)
        events = [ev for _, done in results if isinstance(done, Done) for ev in done.events]
        self._deliver(results, events)

    @staticmethod
    def _run_one(conn: sqlite3.Connection, job: _Job) -> Done[Any] | BaseException:
        conn.execute("SAVEPOINT command")
        try:
            done = job.command(conn)
        except DomainError as exc:
            conn.execute("ROLLBACK TO command")
            conn.execute("RELEASE command")
            return exc
        except sqlite3.OperationalError:
            raise  # disk full, I/O error: fail the whole batch rather than commit around it
        except Exception as exc:  # a bug in one command must not take the others down
            log.exception("write command failed")
            conn.execute("ROLLBACK TO command")
            conn.execute("RELEASE command")
            return exc
        conn.execute("RELEASE command")
        return done

    def _set_health(self, healthy: bool) -> None:
        if healthy != self.healthy:
            self.healthy = healthy
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._on_health, healthy)

    def _deliver(self, results: list[tuple[_Job, Done[Any] | BaseException]], events: list[SessionEvent]) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_resolve, self._on_commit, results, events)
        except RuntimeError:
            log.warning("event loop closed before %d results could be delivered", len(results))


def _resolve(
    on_commit: Callable[[list[SessionEvent]], None],
    results: list[tuple[_Job, Done[Any] | BaseException]],
    events: list[SessionEvent],
) -> None:
    try:
        if events:
            on_commit(events)
    except Exception:  # a failing subscriber must not leave callers waiting on committed writes
        log.exception("on_commit failed for %d events", len(events))
    for job, done in results:
        if job.future.done():  # the caller went away; the write stands
            continue
        if isinstance(done, BaseException):
            job.future.set_exception(done)
        elif done.error is not None:
            job.future.set_exception(done.error)
        else:
            job.future.set_result(done.value)
