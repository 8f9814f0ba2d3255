"""History retention: prunes events older than the retention period, in small write batches.

Never an event of a RUNNING session, nor any session's latest event (see store.commands.prune_events).
"""
from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from .background import BackgroundLoop
from .domain.errors import DomainError
from .store.store import Store

log = logging.getLogger(__name__)


class Retention(BackgroundLoop):
    name = "flowsession-retention"

    def __init__(self, store: Store, retention: timedelta):
        super().__init__()
        self._store = store
        self._retention = retention
        # Pruning often enough that history overshoots retention by at most a tenth (at most 10 min).
        self._interval = min(retention.total_seconds() / 10, 600.0)
        # Passes start at a floor (store.commands.prune_events); the first one and one a day after
        # it read the whole history, for events a clock that stepped back stamped below the floor.
        self._full_every = max(1, round(86_400 / self._interval))
        self._passes = 0

    def start(self) -> None:
        self._spawn(self._run())

    @property
    def passes(self) -> int:
        """Passes completed."""
        return self._passes

    async def prune(self) -> int:
        """Prunes everything due now; returns how many events were removed."""
        total = 0
        if self._passes % self._full_every == 0:
            # From the start, each call going on where the one before got to...
            at = 0
            while (pruned := await self._store.prune_events(self._retention, from_us=at)).removed:
                total += pruned.removed
                at = pruned.through_us
        # ...and from the floor: what ended meanwhile, and the floor's next value.
        while (pruned := await self._store.prune_events(self._retention)).removed:
            total += pruned.removed
        self._passes += 1  # only a pass that got through: a failed one is tried again whole
        return total

    async def _run(self) -> None:
        while True:
            try:
                removed = await self.prune()
                if removed:
                    log.info("retention removed %d events", removed)
            except DomainError as exc:
                log.warning("retention pass failed: %s", exc)
            await asyncio.sleep(self._interval)  # a period, not synchronisation
