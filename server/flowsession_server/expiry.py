"""The deadline scheduler: wakes at the earliest expire_time of a RUNNING session, not on a coarse poll.

New sessions wake it (``observe``) when they bring an earlier deadline. Sessions whose deadline passed
while the server was down are expired on the first pass after start.
"""
from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from .background import BackgroundLoop
from .clock import Clock
from .domain.errors import DomainError
from .domain.model import EventType, SessionEvent
from .store.store import Store

log = logging.getLogger(__name__)

BATCH = 1000


class ExpiryScheduler(BackgroundLoop):
    name = "flowsession-expiry"

    def __init__(self, store: Store, clock: Clock, *, retry_delay: float = 0.5):
        super().__init__()
        self._store = store
        self._clock = clock
        self._retry_delay = retry_delay
        self._wake = asyncio.Event()
        self._next_due: datetime | None = None
        # The earliest deadline of the sessions created since the current pass began: the pass's read of
        # the next deadline may predate their commit (another process's, published by the feed), and
        # they did not wake the scheduler, since their deadlines are later than the one due now.
        self._created_since: datetime | None = None

    def start(self) -> asyncio.Task[None]:
        return self._spawn(self._run())

    def observe(self, events: list[SessionEvent]) -> None:
        """Called after each commit: a new session with an earlier deadline moves the next wake-up."""
        for event in events:
            if event.type is not EventType.CREATED:
                continue
            due = event.session.expire_time
            if self._created_since is None or due < self._created_since:
                self._created_since = due
            if self._next_due is None or due < self._next_due:
                self._wake.set()

    async def _run(self) -> None:
        while True:
            # Clear before reading the next deadline, so a wake-up that lands in between is not lost.
            self._wake.clear()
            self._created_since = None
            try:
                if await self._store.expire_due(limit=BATCH) >= BATCH:
                    continue
                found = await self._store.next_expiry()
                self._next_due = min((d for d in (found, self._created_since) if d is not None), default=None)
            except DomainError as exc:  # the store is busy or failing: health shows it; try again shortly
                log.warning("expiry pass failed: %s", exc)
                self._next_due = None
                await self._sleep_or_wake(self._retry_delay)
                continue
            delay = None if self._next_due is None else (self._next_due - self._clock.now()).total_seconds()
            if delay is None or delay > 0:
                await self._sleep_or_wake(delay)

    async def _sleep_or_wake(self, delay: float | None) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=delay)
        except TimeoutError:
            pass
