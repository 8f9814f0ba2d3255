"""The deadline scheduler: wakes at the earliest expire_time of a RUNNING session, not on a coarse poll.

New sessions wake it (``observe``) when they bring an earlier deadline. Sessions whose deadline passed
while the server was down are expired on the first pass after start.

Deadlines are wall-clock times, but sleeps run on the loop's monotonic clock, which neither follows a
wall-clock step nor (on Linux) advances while the machine is suspended. So no sleep is longer than
MAX_SLEEP: after each wake the wall clock is read again, and the store only once the deadline passed.
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
# The longest sleep towards a deadline, so how late expiry runs after the wall clock steps forward or a
# suspended machine resumes. A wake with nothing due reads the clock, not the store: once a second costs
# nothing beside the change feed's 50 looks a second, and reads never show RUNNING past the deadline
# anyway (they expire an overdue session themselves), so only watchers see that second.
MAX_SLEEP = 1.0


class ExpiryScheduler(BackgroundLoop):
    name = "flowsession-expiry"

    def __init__(self, store: Store, clock: Clock, *, retry_delay: float = 0.5, max_sleep: float = MAX_SLEEP):
        super().__init__()
        self._store = store
        self._clock = clock
        self._retry_delay = retry_delay
        self._max_sleep = max_sleep
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
            await self._until_due()

    async def _until_due(self) -> None:
        """Returns once the next deadline passed by the wall clock, or a wake-up came."""
        if self._next_due is None:  # nothing RUNNING: only a new session (observe) brings a deadline
            await self._wake.wait()
            return
        while (delay := (self._next_due - self._clock.now()).total_seconds()) > 0:
            if await self._sleep_or_wake(min(delay, self._max_sleep)):
                return

    async def _sleep_or_wake(self, delay: float) -> bool:
        """True if woken before ``delay`` seconds (of the loop's clock) passed."""
        # asyncio.timeout, not wait_for: no task per wake, and it wakes every MAX_SLEEP.
        try:
            async with asyncio.timeout(delay):
                await self._wake.wait()
        except TimeoutError:
            return False
        return True
