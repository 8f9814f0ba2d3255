"""The change feed (events/feed.py) on a real store: this process's commits are published straight from
the writer, and the log is read back only for what another process committed."""
from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from datetime import timedelta
from pathlib import Path
from collections.abc import AsyncIterator
from typing import Any

import pytest
from flowsession_server.clock import FakeClock
from flowsession_server.domain.errors import Unavailable
from flowsession_server.domain.model import LogPosition, SessionEvent
from flowsession_server.events.feed import Feed
from flowsession_server.store.store import Store

from .test_store import DEADLINE_S, ENV, T0, Recorder, create, db, published_flow, report

POLL = 0.001  # the feed looks at the log's head a thousand times a second: every race gets its chance


def _unexpected_loss(position: LogPosition) -> None:
    pytest.fail(f"the feed reported events lost up to {position}")


async def _open_with_feed(
    path: str, published: list[SessionEvent], *, lost: list[LogPosition] | None = None, poll: float = POLL
) -> tuple[Store, Feed, list[int]]:
    """A store whose commits go through a feed, and a count of the feed's reads of the log. Losses go to
    ``lost``; with none given, a loss fails the test."""

    store = Store(path, FakeClock(T0))
    feed = Feed(store, [published.extend], poll_interval=poll, on_lost=_unexpected_loss if lost is None else lost.append)
    reads: list[int] = []
    read_log = store.log_after

    async def counted(after_cursor: int, limit: int) -> tuple[LogPosition, list[SessionEvent]]:
        reads.append(after_cursor)
        return await read_log(after_cursor, limit)

    store.log_after = counted  # type: ignore[method-assign]
    await store.open(feed.on_commit, lambda healthy: None)
    await feed.start()
    return store, feed, reads


@contextlib.asynccontextmanager
async def _two_processes(path: str, published: list[SessionEvent]) -> AsyncIterator[tuple[Store, list[int], Store]]:
    """This process's store with its feed (as _open_with_feed), and a second store on the same file
    that stands for another server process; all closed on exit."""
    store, feed, reads = await _open_with_feed(path, published)
    other = Store(path, FakeClock(T0))
    await other.open(Recorder().on_commit, lambda healthy: None)
    try:
        yield store, reads, other
    finally:
        await other.close()
        await feed.stop()
        await store.close()


async def _until(condition: Any) -> None:
    async with asyncio.timeout(DEADLINE_S):
        while not condition():
            await asyncio.sleep(POLL)  # polls a condition under a deadline; no timing assumption


def test_a_head_read_between_commit_and_publication_does_not_read_the_log(tmp_path: Path) -> None:
    """The feed may read the log's head after the writer's COMMIT landed and before the writer handed
    the events over. Those events are on their way: reading them back would only delay them."""

    async def body() -> None:
        published: list[SessionEvent] = []
        store, feed, reads = await _open_with_feed(db(tmp_path), published)
        try:
            flow = await published_flow(store)
            # (batch's cursor range, head read) for each head read that saw a commit not yet published.
            heads_seen: list[tuple[tuple[int, int], int]] = []
            read_head = store.max_cursor

            async def head() -> int:
                cursor = await read_head()
                publishing = store.publishing  # set before the COMMIT, cleared once handed over
                if publishing is not None and cursor >= publishing[1]:
                    heads_seen.append((publishing, cursor))
                return cursor

            store.max_cursor = head  # type: ignore[method-assign]
            writer = store._writer
            assert writer is not None
            writer._slow_commit = 0.0  # commits on the disk thread, as when they are slow: the loop goes on meanwhile
            on_disk = writer._on_disk

            async def commit_then_hold(fn: Any, *args: Any) -> Any:
                # Holds the writer after COMMIT until the feed has read the new head. (Flagging "landed"
                # on the loop after the disk thread returned missed the feed's read when it came first.)
                result = await on_disk(fn, *args)
                if fn == writer._timed_commit:
                    batch = store.publishing
                    await _until(lambda: any(seen == batch for seen, _ in heads_seen))
                return result

            writer._on_disk = commit_then_hold  # type: ignore[method-assign]
            before = len(published)
            ids = [f"ses_{i}" for i in range(3)]
            await asyncio.gather(*(create(store, flow.flow_id, sid) for sid in ids))
            await store.change_session(ENV, "ses_0", report("check", "retry"))
            cursors = [e.cursor for e in published[before:]]
            assert len(cursors) == 4 and cursors == list(range(cursors[0], cursors[0] + 4))
            assert reads == []
        finally:
            await feed.stop()
            await store.close()

    asyncio.run(body())


def test_another_process_commits_are_read_from_the_log_in_order(tmp_path: Path) -> None:
    async def body() -> None:
        path = db(tmp_path)
        published: list[SessionEvent] = []
        async with _two_processes(path, published) as (store, reads, other):
            flow = await published_flow(store)
            await create(store, flow.flow_id, "ses_here")
            await create(other, flow.flow_id, "ses_there")
            await store.change_session(ENV, "ses_here", report("check", "retry"))
            await _until(lambda: len(published) == 3)
            assert [(e.session_id, e.version) for e in published] == [("ses_here", 1), ("ses_there", 1), ("ses_here", 2)]
            assert [e.cursor for e in published] == sorted(e.cursor for e in published)
            assert reads  # the other process's event could only come from the log

    asyncio.run(body())


def test_a_failed_commit_does_not_hide_the_next_process_commits_with_the_same_cursors(tmp_path: Path) -> None:
    """A batch whose COMMIT fails is rolled back, and its cursors are handed out again, here to another
    process: the feed must read that process's events, not take them for the failed batch."""

    async def body() -> None:
        path = db(tmp_path)
        published: list[SessionEvent] = []
        async with _two_processes(path, published) as (store, _, other):
            flow = await published_flow(store)
            await create(store, flow.flow_id, "ses_1")
            writer = store._writer
            assert writer is not None
            commit = writer._commit

            def failing_commit(conn: sqlite3.Connection) -> None:
                writer._commit = commit  # type: ignore[method-assign]  # once
                raise sqlite3.OperationalError("disk I/O error")

            writer._commit = failing_commit  # type: ignore[method-assign]
            with pytest.raises(Unavailable):
                await create(store, flow.flow_id, "ses_lost")
            assert store.publishing is None
            await create(other, flow.flow_id, "ses_there")
            await _until(lambda: len(published) == 2)
            assert [e.session_id for e in published] == ["ses_1", "ses_there"]

    asyncio.run(body())


def test_the_feeds_change_signal_moves_on_another_connections_commit_and_not_before(tmp_path: Path) -> None:
    """The feed skips reading the log while Store.data_version() stands still, so it must move with a
    commit by any other connection and not with writes that are not visible yet. A check of the files
    (used before) moved as soon as the WAL was written, and a look between that and the commit becoming
    visible hid the commit until the next one."""

    async def body() -> None:
        path = db(tmp_path)
        store = Store(path, FakeClock(T0))
        await store.open(Recorder().on_commit, lambda healthy: None)
        other = sqlite3.connect(path, isolation_level=None)
        try:
            before = store.data_version()
            assert before is not None
            assert store.data_version() == before  # reads, its own included, move nothing
            wal = Path(path + "-wal")
            size = wal.stat().st_size
            other.execute("PRAGMA cache_size=1")  # pages spill into the WAL before COMMIT
            other.execute("BEGIN IMMEDIATE")
            for i in range(50):
                other.execute("INSERT INTO meta (key, value) VALUES (?, ?)", [f"probe_{i}", "x" * 4000])
            assert wal.stat().st_size > size  # the files changed...
            assert store.data_version() == before  # ...but nothing is committed
            other.execute("COMMIT")
            after = store.data_version()
            assert after is not None and after != before
            flow = await published_flow(store)  # this process's writer is another connection too
            assert flow is not None and store.data_version() != after
            # No read transaction is left open by it, or the WAL could never be checkpointed.
            assert other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        finally:
            other.close()
            await store.close()

    asyncio.run(body())


def test_a_failed_read_of_the_log_is_retried_without_waiting_for_another_commit(tmp_path: Path) -> None:
    """The feed reads the log when SQLite's data version moved; a read that fails must not count as
    done, or another process's commit would wait for the next commit, however long that takes."""

    async def body() -> None:
        path = db(tmp_path)
        published: list[SessionEvent] = []
        async with _two_processes(path, published) as (store, _, other):
            flow = await published_flow(store)
            read_head = store.max_cursor
            before = await read_head()
            failed: list[bool] = []

            async def failing_once() -> int:
                head = await read_head()
                if not failed and head > before:  # the read that would have found the other's commit
                    failed.append(True)
                    raise Unavailable("the store could not be read: disk I/O error", reason="STORE_UNAVAILABLE")
                return head

            store.max_cursor = failing_once  # type: ignore[method-assign]
            await create(other, flow.flow_id, "ses_there")  # nothing commits after it
            await _until(lambda: published)
            assert failed and [e.session_id for e in published] == ["ses_there"]

    asyncio.run(body())


def test_a_commit_right_after_the_feeds_starting_head_is_published(tmp_path: Path) -> None:
    """The feed starts from the log's head and then looks only when SQLite's data version moves: a
    commit landing between the two must count as a move, or it would wait for the next commit."""

    async def body() -> None:
        path = db(tmp_path)
        other = Store(path, FakeClock(T0))
        await other.open(Recorder().on_commit, lambda healthy: None)
        store = Store(path, FakeClock(T0))
        published: list[SessionEvent] = []
        feed = Feed(store, [published.extend], poll_interval=POLL, on_lost=_unexpected_loss)
        try:
            flow = await published_flow(other)
            await store.open(feed.on_commit, lambda healthy: None)
            read_head = store.head

            async def head_then_another_commit() -> Any:
                position = await read_head()
                await create(other, flow.flow_id, "ses_there")  # after the head the feed starts from
                return position

            store.head = head_then_another_commit  # type: ignore[method-assign]
            await feed.start()
            await _until(lambda: published)  # nothing commits after it
            assert [e.session_id for e in published] == ["ses_there"]
        finally:
            await feed.stop()
            await store.close()
            await other.close()

    asyncio.run(body())


def test_events_another_process_pruned_before_the_feed_read_them_are_reported_lost(tmp_path: Path) -> None:
    """A feed that fell behind another process's commits by more than the retention period read the log
    with holes where retention had deleted events, and published the rest as if nothing were missing:
    the WatchSessions streams of its process skipped them. The loss is reported first, then the rest
    is published."""

    async def body() -> None:
        path = db(tmp_path)
        published: list[SessionEvent] = []
        lost: list[LogPosition] = []
        store, feed, _ = await _open_with_feed(path, published, lost=lost, poll=3600)  # it looks only when woken
        clock = FakeClock(T0)
        other = Store(path, clock)
        await other.open(Recorder().on_commit, lambda healthy: None)
        try:
            flow = await published_flow(other)
            await create(other, flow.flow_id, "ses_there")
            await other.change_session(ENV, "ses_there", report("check", "retry"))
            await other.change_session(ENV, "ses_there", report("check", "ok"))  # ended: prunable once old
            clock.advance(timedelta(days=8))
            assert (await other.prune_events(timedelta(days=7))).removed == 2  # before this feed read them
            oldest = await store.oldest_position()
            await create(store, flow.flow_id, "ses_here")  # not next to the last published: the feed reads the log
            await _until(lambda: any(e.session_id == "ses_here" for e in published))
            assert lost == [oldest]
            assert [(e.session_id, e.version) for e in published] == [("ses_there", 3), ("ses_here", 1)]
            assert feed.last_cursor == published[-1].cursor
        finally:
            await other.close()
            await feed.stop()
            await store.close()

    asyncio.run(body())
