"""The change feed: publishes every committed event to the hub exactly once, in cursor (commit) order,
whichever process on the database file committed it.

This process's own commits are published at once when they directly follow the last published cursor.
Otherwise (another process committed in between) and on a short poll of the log's head, the feed reads
the missing range from the store, so watchers on any process see every change, another process's about
one poll interval (plus the read) after its commit. Should retention have deleted some of that range
before the feed read it (the feed fell behind by more than the retention period), ``on_lost`` is told
where the loss ends, before the rest is published.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from ..background import BackgroundLoop
from ..domain.errors import DomainError
from ..domain.model import START, LogPosition, SessionEvent
from ..store.store import Store

log = logging.getLogger(__name__)

PAGE = 1000


class Feed(BackgroundLoop):
    name = "flowsession-feed"

    def __init__(
        self,
        store: Store,
        subscribers: list[Callable[[list[SessionEvent]], None]],
        *,
        poll_interval: float,
        on_lost: Callable[[LogPosition], None],
    ):
        super().__init__()
        self._store = store
        self._subscribers = subscribers
        self._on_lost = on_lost
        self._poll_interval = poll_interval
        self.last_cursor = 0
        self.head_at_start: LogPosition = START
        self._catching_up = False
        self._wake = asyncio.Event()

    async def start(self) -> None:
        # The version first: a commit after it is noticed, whether or not the head read below saw it.
        version = self._store.data_version()
        self.head_at_start = await self._store.head()
        self.last_cursor = self.head_at_start.cursor
        self._spawn(self._run(version))

    def on_commit(self, events: list[SessionEvent]) -> None:
        """The writer's callback, on the event loop, in commit order."""
        if not self._catching_up and events[0].cursor == self.last_cursor + 1:
            self._publish(events)
        else:
            self._wake.set()

    def _publish(self, events: list[SessionEvent]) -> None:
        self.last_cursor = events[-1].cursor
        for subscriber in self._subscribers:
            subscriber(events)

    async def _run(self, version: int | None) -> None:
        backoff = 0.0  # while reads of the log fail: the wait before the next try, doubling up to 1 s
        while True:
            try:
                # asyncio.timeout, not wait_for: no task per poll, and the poll runs 50 times a second.
                async with asyncio.timeout(self._poll_interval):
                    await self._wake.wait()
                woken = True
            except TimeoutError:
                woken = False
            self._wake.clear()
            # An idle poll only asks SQLite whether anything was committed since the last one; the log
            # is read when something was, or when a local commit did not follow on. (A check of the
            # files' times and sizes, used before, could run after a commit's WAL write and before the
            # commit became visible; the next commit or a full check a second later then delivered it.)
            seen = self._store.data_version()
            if not woken and seen is not None and seen == version:
                continue
            version = seen
            try:
                head = await self._store.max_cursor()
                if head > self.last_cursor and not self._own_commit_covers(head):
                    await self._catch_up()
            except DomainError as exc:
                version = None  # read again: the commit it missed changes nothing more
                if not backoff:
                    log.warning("change feed could not read the log: %s; retrying", exc)
                backoff = min(1.0, max(self._poll_interval, backoff * 2))
                await asyncio.sleep(backoff)  # a retry period, not synchronisation
                continue
            if backoff:
                log.info("change feed reads the log again")
                backoff = 0.0

    def _own_commit_covers(self, head: int) -> bool:
        """True when every event after the last published one up to ``head`` is this process's own
        commit, about to reach on_commit: reading it back from the log would only delay it. (Another
        process's events cannot interleave with it: one write lock, cursors assigned under it.)"""
        publishing = self._store.publishing
        return publishing is not None and publishing[0] == self.last_cursor + 1 and head <= publishing[1]

    async def _catch_up(self) -> None:
        self._catching_up = True
        try:
            while True:
                oldest, events = await self._store.log_after(self.last_cursor, PAGE)
                if oldest.cursor > self.last_cursor:  # deleted before it was read: never published
                    self.last_cursor = oldest.cursor
                    self._on_lost(oldest)
                if events:
                    self._publish(events)
                if len(events) < PAGE:
                    return
        finally:
            self._catching_up = False
