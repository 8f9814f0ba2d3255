"""The single writer: one write connection per process, commands committed in batches.

Group commit: every command waiting when a batch starts runs in one transaction, each inside its own
SAVEPOINT so a failing command rolls back alone, and the batch costs one fsync. Callers await an
asyncio future. Committed events are handed to ``on_commit`` in commit order, before the callers'
futures resolve.

Where the work runs: the commands and their statements run on the event loop (Python and SQLite's
page-cache work, which held the GIL most of the time anyway). COMMIT (the fsync) runs on the loop too
while commits are fast: the sqlite3 module releases the GIL for it, and a commit handed to a thread
waited twice for that thread to win the GIL back from the busy loop (to start, and to report back),
which in the bench made watch delivery at 1,000 changes/s several times slower (p50 2-3 ms, p99 8-44 ms,
against 0.8-1.3 ms and 2.5-9.2 ms on the loop) and cost more CPU per change. When commits get slow (a
slow or busy disk: their moving average passes SLOW_COMMIT_S, or one took STALLED_COMMIT_S), they move to the
writer's disk thread so the loop keeps serving reads and streams meanwhile; so does BEGIN whenever
another process holds the write lock. The first commit of a stall cannot be foreseen: it blocks the loop
for as long as it takes, once per DISK_HOLD_S at most.

A commit on the disk thread is timed with every wait for the GIL in it (the sqlite3 module releases it
for each step of COMMIT, as os.stat does for the file checks around it, and a busy loop keeps each wait
up to the 5 ms switch interval): a fast disk under load timed at 5-60 ms there, so commits never came
back, and "stalls" renewed the hold. So one there counts only when fast (it is fast with its waits),
only a commit on the loop starts or renews the hold, and while the average keeps commits on the disk
thread, one commit per PROBE_S runs on the loop to time the disk again.

The price of the loop commit: at saturation the loop waits out each fsync instead of working meanwhile,
and fewer commands share a commit. The bench's closed loops lost 1-9% of their status changes/s, but a
closed loop over 2,000 sessions dropped from about 2,100 to 1,400 changes/s (README, Group commit).

Checkpoints (copying the WAL back into the database file) never run inside COMMIT (the connection's
automatic checkpoint is off, as it would stall the loop for milliseconds): every CHECKPOINT_COMMITS
commits or CHECKPOINT_ROWS changed rows, and after every batch while the WAL is long, the writer runs a
PASSIVE one on the disk thread between two batches.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

from ..domain.errors import DomainError, Unavailable
from ..domain.model import SessionEvent
from . import schema

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long BEGIN waits for another process's write lock (on the disk thread) before the batch fails.
LOCK_WAIT_MS = 30_000
# The slices of that wait, between which the disk thread sees a shutdown's deadline.
LOCK_WAIT_SLICE_MS = 50
# COMMIT runs on the loop while the moving average of commit times stays under this (seconds).
SLOW_COMMIT_S = 0.002
# The moving average's weight of the latest commit.
COMMIT_AVERAGE_WEIGHT = 1 / 8
# A commit on the loop this slow is the disk, not a wait for the GIL (each wait is bounded by the 5 ms
# switch interval, and a busy machine's scheduling): commits then stay on the disk thread for DISK_HOLD_S,
# renewed by every such commit on the loop (the probe after a hold), so a disk that stalls now and then
# stalls the loop once per DISK_HOLD_S at most. On the disk thread, where several waits for the GIL add
# up, such a time says nothing (see the module docstring).
STALLED_COMMIT_S = 0.05
DISK_HOLD_S = 10.0
# While the average keeps commits on the disk thread, one commit per PROBE_S runs on the loop, where its
# time is the disk's (see the module docstring); a stall's hold has no probes.
PROBE_S = 1.0
# A checkpoint after this many commits or changed rows (about SQLite's default 1,000 WAL pages), and
# after every batch while the WAL holds more than CHECKPOINT_FRAMES frames.
CHECKPOINT_COMMITS = 100
CHECKPOINT_ROWS = 500
CHECKPOINT_FRAMES = 1000
# While a failed commit keeps the store unhealthy and no command comes, the writer commits a write of
# its own this often (one meta row), so health comes back once the fault is over even when
# nothing else writes: a load balancer or client that follows health sends no calls meanwhile.
RECHECK_S = 1.0


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


Result = tuple[_Job, "Done[Any] | BaseException"]


class Writer:
    def __init__(
        self,
        path: str,  # absolute
        *,
        synchronous: str,
        on_commit: Callable[[list[SessionEvent]], None],
        on_health: Callable[[bool], None],
        max_batch: int = 512,
        on_rollback: Callable[[], None] | None = None,
    ):
        self._path = path
        self._synchronous = synchronous
        self._on_commit = on_commit
        self._on_health = on_health
        self._max_batch = max_batch
        # Called whenever a batch is rolled back as a whole: what its commands read is undone too, so
        # whatever they remembered of it must go (commands.PublishedVersions).
        self._on_rollback = on_rollback
        self._slow_commit = SLOW_COMMIT_S  # tests lower it to force commits onto the disk thread
        self._recheck_s = RECHECK_S  # tests lower it
        self._recheck_at = 0.0  # time.monotonic() of the next re-check a busy unhealthy writer adds to a batch
        self._commit_time = 0.0  # moving average, seconds
        self._disk_until = 0.0  # time.monotonic() until which commits stay on the disk thread
        # time.monotonic() from which the next commit runs on the loop although the average is high; None
        # until a commit on the loop found it high.
        self._probe_at: float | None = None
        self.commits_on_loop = 0
        self.commits_on_disk = 0
        self._since_checkpoint = (0, 0)  # (commits, conn.total_changes) at the last checkpoint
        self._wal_frames = 0  # in the WAL after the last checkpoint
        self.checkpoints = 0
        self._jobs: deque[_Job] = deque()
        self._batch_size = 0  # commands of the batch being committed
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None
        # The database file as opened, (device, inode); once it is no longer at the path, why every
        # write is refused.
        self._file: tuple[int, int] | None = None
        self._wal: tuple[int, int] | None = None  # its -wal as opened (None: none then, not checked)
        self._moved: str | None = None
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowsession-writer-disk")
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed: asyncio.Future[None] | None = None  # close()'s work, once
        # time.monotonic() after which BEGIN stops waiting for another process's lock (shutdown).
        self._lock_wait_until: float | None = None
        self.healthy = False
        # (first, last) cursor of the events of the batch between COMMIT and on_commit, else None
        # (cleared as soon as a batch ends, however it ends).
        self.publishing: tuple[int, int] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._conn = schema.connect(self._path, synchronous=self._synchronous)
        self._file = _identity(self._path)
        self._wal = _identity(self._path + "-wal")
        # On the loop a busy lock must fail at once; BEGIN then waits for it on the disk thread.
        self._conn.execute("PRAGMA busy_timeout=0")
        self._conn.execute("PRAGMA wal_autocheckpoint=0")  # see _checkpoint
        self.healthy = True
        self._task = loop.create_task(self._run(), name="flowsession-writer")

    async def submit(self, command: Command) -> Any:
        """Runs ``command`` in the next batch; returns its value or raises its error."""
        if self._closing:
            raise Unavailable.shutting_down()
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        self._jobs.append(_Job(command, future))
        self._wake.set()
        return await future

    @property
    def commits(self) -> int:
        """COMMITs attempted, on the loop and on the disk thread."""
        return self.commits_on_loop + self.commits_on_disk

    @property
    def queued(self) -> int:
        """Commands submitted and not yet answered: waiting for a batch, or in the one being committed."""
        return len(self._jobs) + self._batch_size

    def stop_waiting_by(self, deadline: float) -> None:
        """From ``deadline`` (time.monotonic()) on, a batch waiting for another process's write lock is
        refused with SHUTTING_DOWN (nothing of it was written) instead of waiting up to 30 s: a
        stopping server answers its calls within its grace rather than have gRPC cancel them."""
        self._lock_wait_until = deadline

    async def close(self) -> None:
        """Refuses new commands, commits every queued one, then closes the connection. Cancelling it
        stops the wait, not the closing: the writer task is not cancelled with it (a COMMIT on the disk
        thread would land with its callers never answered, and the connection stay open)."""
        self._closing = True
        self._wake.set()
        if self._closed is None:
            self._closed = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closed)

    async def _close(self) -> None:
        if self._task is not None:
            await asyncio.wait([self._task])  # not ``await``: a task cancelled elsewhere must not stop this
        if self._conn is not None:
            await self._on_disk(self._conn.close)
        self._disk.shutdown(wait=True)

    async def _on_disk(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._disk, fn, *args)

    async def _run(self) -> None:
        while True:
            if not self._jobs:
                if self._closing:
                    return
                self._wake.clear()
                if self.healthy or self._moved is not None:
                    await self._wake.wait()
                    continue
                try:
                    async with asyncio.timeout(self._recheck_s):
                        await self._wake.wait()
                except TimeoutError:
                    self._recheck_at = time.monotonic() + self._recheck_s
                    self._jobs.append(self._recheck())
                continue
            # Commands that write nothing (refused changes, idempotent replays) must not starve the
            # re-check: while unhealthy, it runs as a batch of its own (so that its failure is not theirs)
            # before theirs, at most once per _recheck_s.
            if not self.healthy and self._moved is None and time.monotonic() >= self._recheck_at:
                self._recheck_at = time.monotonic() + self._recheck_s
                batch = [self._recheck()]
            else:
                batch = [self._jobs.popleft() for _ in range(min(len(self._jobs), self._max_batch))]
            self._batch_size = len(batch)
            try:
                await self._commit_batch(batch)
            except Exception:  # a bug here must not leave callers waiting, nor stop the writer
                self.publishing = None  # now, not after the awaits below: the feed may look meanwhile
                log.exception("write batch failed")
                await self._rollback()
                self._refuse(batch, "the store could not commit")
            finally:
                self.publishing = None
                self._batch_size = 0
            try:
                if self._checkpoint_due():
                    await self._checkpoint()
            except Exception:  # as for a batch: the writer must go on
                log.exception("checkpoint failed")

    async def _commit_batch(self, batch: list[_Job]) -> None:
        conn = self._conn
        assert conn is not None
        results: list[Result] = []
        if self._moved is not None:
            self._refuse(batch, self._moved)
            return
        changes = conn.total_changes
        try:
            await self._begin(conn)
            for job in batch:
                # Its caller went away (deadline, cancel) while it waited, for another process's lock
                # say: unwritten, it stays so, and a retry (an abort has no request_id) finds no surprise.
                if not job.future.cancelled():
                    results.append((job, self._run_one(conn, job)))
            events = [ev for _, done in results if isinstance(done, Done) for ev in done.events]
            if events:
                self.publishing = (events[0].cursor, events[-1].cursor)
            if self._commit_on_loop():
                self.commits_on_loop += 1
                self._timed(self._timed_commit(conn), on_loop=True)
            else:
                self.commits_on_disk += 1
                self._timed(await self._on_disk(self._timed_commit, conn), on_loop=False)
        except _Moved as exc:
            self.publishing = None
            self._moved = (
                f"the database file {self._path} or its -wal was removed or moved away while open; restart the server"
            )
            if exc.committed:
                log.error("%s: the last batch committed into the moved file anyway", self._moved)
            else:
                await self._rollback()
            if exc.wal:
                await self._save_wal()
            log.error("%s: %d commands are refused, and every later one", self._moved, len(batch))
            self._set_health(False)
            self._refuse(batch, self._moved)
            return
        except _GaveUpWaiting:
            log.warning("shutting down: %d commands waiting for another process's write lock are refused", len(batch))
            _resolve(self._on_commit, [(job, Unavailable.shutting_down("nothing of it was written; retry it")) for job in batch], [])
            return
        except (sqlite3.Error, OSError) as exc:  # OSError: the file at the path could not be checked
            self.publishing = None  # rolled back: nothing of it will be published
            if all(job.command is _touch for job in batch):  # the re-check, once a second: the fault goes on
                log.debug("the store is still not writable: %s", exc)
            else:
                log.exception("commit failed; %d commands are refused", len(batch))
            await self._rollback()
            self._set_health(False)
            self._refuse(batch, f"the store could not commit: {exc}")
            return
        # Only a commit that wrote shows the store writable again: one of commands that were all refused,
        # or found nothing to do, succeeds on a full disk too.
        if conn.total_changes != changes:
            self._set_health(True)
        _resolve(self._on_commit, results, events)

    def _recheck(self) -> _Job:
        """A command that writes, and that nobody waits for: run while the store is unhealthy."""
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # its failure is the health's
        return _Job(_touch, future)

    def _timed_commit(self, conn: sqlite3.Connection) -> float:
        """COMMIT; returns the seconds it took (on the disk thread: with the wait for the GIL after it,
        so a busy loop keeps commits there, where they do not hold it up)."""
        start = time.perf_counter()
        self._commit(conn)
        return time.perf_counter() - start

    def _commit_on_loop(self) -> bool:
        now = time.monotonic()
        if now < self._disk_until:
            return False
        if self._commit_time < self._slow_commit:
            return True
        return self._probe_at is not None and now >= self._probe_at

    def _timed(self, took: float, *, on_loop: bool) -> None:
        """Takes a commit's time into account. Off the loop it is the disk's time plus the waits for
        the GIL: only a fast one says anything about the disk (see the module docstring)."""
        if on_loop or took < self._slow_commit:
            self._commit_time += (took - self._commit_time) * COMMIT_AVERAGE_WEIGHT
        if not on_loop:
            return
        now = time.monotonic()
        if took >= STALLED_COMMIT_S:
            if now >= self._disk_until:
                log.warning("a commit took %.0f ms: commits run on the disk thread for %.0f s", took * 1000, DISK_HOLD_S)
            self._disk_until = now + DISK_HOLD_S
        self._probe_at = now + PROBE_S if self._commit_time >= self._slow_commit else None

    def _checkpoint_due(self) -> bool:
        assert self._conn is not None
        commits, rows = self._since_checkpoint
        return (
            self.commits - commits >= CHECKPOINT_COMMITS
            or self._conn.total_changes - rows >= CHECKPOINT_ROWS
            or (self._wal_frames > CHECKPOINT_FRAMES and self.commits > commits)
        )

    async def _checkpoint(self) -> None:
        """A PASSIVE checkpoint (it never waits for a lock) on the disk thread, between batches. The WAL
        starts over only once a checkpoint has copied all of it before the next commit, which a
        checkpoint racing this writer's commits never does (the WAL grew without end), and one racing
        another process's seldom does (253 MB in a minute with two servers checkpointing every 100
        commits): so while the WAL is long it runs after every batch, as SQLite's own ran after every
        commit. The next batch waits for it, as it waited for the automatic one inside COMMIT; the
        loop does not."""
        conn = self._conn
        assert conn is not None
        self._since_checkpoint = (self.commits, conn.total_changes)
        try:
            _busy, frames, _copied = await self._on_disk(
                lambda: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            )
        except sqlite3.Error:
            log.exception("checkpoint failed; the WAL grows until one succeeds")
            return
        if frames >= 0:  # -1: it could not run (another connection was checkpointing); again next batch
            self._wal_frames = frames
        self.checkpoints += 1

    def _commit(self, conn: sqlite3.Connection) -> None:
        """COMMIT, only while the database file is still at its path. In WAL mode
        SQLite goes on committing into a file that was deleted or moved away (it has no
        SQLITE_READONLY_DBMOVED check there): those writes would be lost, or split from a process that
        opens a new file at the path. Checked again after COMMIT for a move in between."""
        if _identity(self._path) != self._file:  # an OSError (it cannot be told) fails this batch alone
            raise _Moved(committed=False)
        # The -wal too: commits into an unlinked one are gone at the next start (the batch that a removal
        # in between lets commit there is saved with the rest, see _save_wal).
        if self._wal is not None and _identity(self._path + "-wal") != self._wal:
            raise _Moved(committed=False, wal=True)
        conn.execute("COMMIT")
        try:
            moved = _identity(self._path) != self._file
        except OSError as exc:  # it was there an instant ago, and the batch has committed
            log.warning("could not check the database file after a commit: %s", exc)
            moved = False
        if moved:
            raise _Moved(committed=True)

    async def _save_wal(self) -> None:
        """The -wal is no longer at the path, so a start would not find what was committed into it since
        the last checkpoint: copy that into the database file while this connection still has both open."""
        conn = self._conn
        assert conn is not None

        def save() -> Any:
            conn.execute("PRAGMA busy_timeout=5000")  # for readers to move on to the latest commit
            try:
                return conn.execute("PRAGMA wal_checkpoint(FULL)").fetchone()
            finally:
                conn.execute("PRAGMA busy_timeout=0")

        try:
            busy, frames, copied = await self._on_disk(save)
        except sqlite3.Error:
            log.exception("could not copy the removed -wal into the database file: commits since the last checkpoint are lost at a restart")
            return
        if busy or copied < frames:
            log.error("copied %d of %d frames of the removed -wal into the database file; the rest is lost at a restart", copied, frames)
        else:
            log.warning("copied the %d frames of the removed -wal into the database file", frames)

    def _refuse(self, batch: list[_Job], message: str) -> None:
        failure = Unavailable(message, reason="STORE_UNAVAILABLE", retry_after=1.0)
        _resolve(self._on_commit, [(job, failure) for job in batch], [])

    async def _rollback(self) -> None:
        """Rolls the batch back, if SQLite has not already (a failed COMMIT often has)."""
        assert self._conn is not None
        if self._on_rollback is not None:
            try:
                self._on_rollback()
            except Exception:
                log.exception("on_rollback failed")
        if self._conn.in_transaction:
            try:
                await self._on_disk(self._conn.execute, "ROLLBACK")
            except sqlite3.Error:
                log.exception("rollback failed too")

    async def _begin(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
            await self._on_disk(self._begin_waiting, conn)  # another process is writing: wait for its lock

    def _begin_waiting(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE for up to LOCK_WAIT_MS, in slices, so that a shutdown can end the wait."""
        give_up = time.monotonic() + LOCK_WAIT_MS / 1000
        conn.execute(f"PRAGMA busy_timeout={LOCK_WAIT_SLICE_MS}")
        try:
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                        raise
                    now = time.monotonic()
                    if self._lock_wait_until is not None and now >= self._lock_wait_until:
                        raise _GaveUpWaiting() from None
                    if now >= give_up:
                        raise
        finally:
            conn.execute("PRAGMA busy_timeout=0")

    @staticmethod
    def _run_one(conn: sqlite3.Connection, job: _Job) -> Done[Any] | BaseException:
        conn.execute("SAVEPOINT command")
        try:
            done = job.command(conn)
        except DomainError as exc:
            conn.execute("ROLLBACK TO command")
            conn.execute("RELEASE command")
            return exc
        except sqlite3.DatabaseError as exc:
            # Disk full, I/O error (OperationalError), a corrupt page or no database (DatabaseError
            # itself): the store failed, so the whole batch does rather than commit around it. The
            # subclasses (IntegrityError, ProgrammingError, ...) are this command's own bug.
            if isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError:
                raise
            log.exception("write command failed")
            conn.execute("ROLLBACK TO command")
            conn.execute("RELEASE command")
            return exc
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
            try:
                self._on_health(healthy)
            except Exception:  # after a COMMIT: the callers must still hear that it committed
                log.exception("on_health failed")


def _touch(conn: sqlite3.Connection) -> Done[None]:
    # A new value: SQLite writes no page for a row updated to the bytes it already holds.
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('write_check', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [os.urandom(8).hex()],
    )
    return Done()


class _GaveUpWaiting(Exception):
    """BEGIN stopped waiting for another process's lock: the server is shutting down."""


class _Moved(Exception):
    def __init__(self, *, committed: bool, wal: bool = False):
        super().__init__()
        self.committed = committed
        self.wal = wal


def _identity(path: str) -> tuple[int, int] | None:
    """The (device, inode) of the file at ``path``; None when there is none. Any other failure (its
    directory made unsearchable for a while, say) raises OSError: it tells nothing about a move, so it
    must not refuse every later write as one does."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


def _resolve(on_commit: Callable[[list[SessionEvent]], None], results: list[Result], events: list[SessionEvent]) -> None:
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
