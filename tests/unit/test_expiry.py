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
