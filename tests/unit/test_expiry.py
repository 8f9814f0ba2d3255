"""The expiry scheduler's wake-ups, against a store stand-in."""
from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from flowsession_server.clock import FakeClock
from flowsession_server.domain.model import EventType
from flowsession_server.expiry import ExpiryScheduler

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DEADLINE_S = 5.0


def created(expire_time: datetime) -> SimpleNamespace:
    return SimpleNamespace(type=EventType.CREATED, session=SimpleNamespace(expire_time=expire_time))


def test_a_session_created_elsewhere_while_a_pass_reads_the_next_deadline_wakes_the_scheduler() -> None:
    # Pass 2 starts at the deadline pass 1 found (now). While it reads the next deadline, the feed
    # publishes another process's new session, committed just after that read's snapshot: the read
    # says "none", and the session's deadline is later than the one due now, so it woke nothing; only
    # the scheduler's memory of what was created during the pass brings it back for that deadline.
    clock = FakeClock(T0)

    class Store:
        def __init__(self) -> None:
            self.passes = 0
            self.third = asyncio.Event()

        async def expire_due(self, *, limit: int) -> int:
            self.passes += 1
            if self.passes == 3:
                self.third.set()
            return 0

        async def next_expiry(self) -> datetime | None:
            if self.passes == 1:
                return T0  # due now: pass 2 follows at once
            if self.passes == 2:
                scheduler.observe([created(T0 + timedelta(milliseconds=50))])
                clock.advance(timedelta(milliseconds=50))  # deadlines are wall-clock times: let it come
            return None

    store = Store()
    scheduler = ExpiryScheduler(store, clock)  # type: ignore[arg-type]

    async def body() -> None:
        scheduler.start()
        try:
            await asyncio.wait_for(store.third.wait(), DEADLINE_S)
        finally:
            await scheduler.stop()

    asyncio.run(body())


class CountingClock(FakeClock):
    """A FakeClock that says when it has been read ``reads`` times."""

    def __init__(self, start: datetime, reads: int):
        super().__init__(start)
        self.count = 0
        self._reads = reads
        self.read_enough = asyncio.Event()

    def now(self) -> datetime:
        self.count += 1
        if self.count >= self._reads:
            self.read_enough.set()
        return super().now()


def test_waking_to_re_check_the_clock_reads_the_store_only_once_the_deadline_passed() -> None:
    # The scheduler wakes every max_sleep to look at the wall clock (it may have stepped while the
    # loop's clock stood still); a wake with nothing due must stay cheap: a clock read, no store read.
    due = T0 + timedelta(hours=1)
    clock = CountingClock(T0, reads=5)

    class Store:
        def __init__(self) -> None:
            self.passes = 0
            self.expired = asyncio.Event()

        async def expire_due(self, *, limit: int) -> int:
            self.passes += 1
            if clock.now() >= due:
                self.expired.set()
                return 1
            return 0

        async def next_expiry(self) -> datetime | None:
            return None if self.expired.is_set() else due

    store = Store()
    scheduler = ExpiryScheduler(store, clock, max_sleep=0.01)  # type: ignore[arg-type]

    async def body() -> None:
        scheduler.start()
        try:
            await asyncio.wait_for(clock.read_enough.wait(), DEADLINE_S)
            assert store.passes == 1  # several wakes, one store pass (at start)
            clock.advance(timedelta(hours=1))  # a step forward: no loop time passes
            await asyncio.wait_for(store.expired.wait(), DEADLINE_S)
            assert store.passes == 2
        finally:
            await scheduler.stop()

    asyncio.run(body())
