"""Per-session fan-out of committed events.

A watcher registers *before* it reads its backlog from the store and drops what it already sent,
so together with the log it sees every event once (ARCHITECTURE.md, convention 6). Each watcher has a
bounded buffer: one that falls behind is ended with WATCHER_TOO_SLOW instead of slowing the writer,
other watchers, or growing without bound.
"""
from __future__ import annotations

import asyncio
from collections import deque

from ..domain.errors import DomainError, ResourceExhausted, Unavailable
from ..domain.model import SessionEvent


class Watcher:
    def __init__(self, session_id: str, capacity: int):
        self.session_id = session_id
        self._capacity = capacity
        self._buffer: deque[SessionEvent] = deque()
        self._ready = asyncio.Event()
        self._ended: DomainError | None = None

    def offer(self, event: SessionEvent) -> None:
        if self._ended is not None:
            return
        if len(self._buffer) >= self._capacity:
            self.end(
                ResourceExhausted(
                    f"the watcher fell more than {self._capacity} events behind; resume from the last version received",
                    reason="WATCHER_TOO_SLOW",
                )
            )
            return
        self._buffer.append(event)
        self._ready.set()

    def end(self, error: DomainError) -> None:
        """Ends the watch: ``next()`` raises ``error`` as soon as it is called."""
        self._ended = error
        self._buffer.clear()
        self._ready.set()

    async def next(self) -> SessionEvent:
        while True:
            if self._ended is not None:
                raise self._ended
            if self._buffer:
                return self._buffer.popleft()
            self._ready.clear()
            await self._ready.wait()


class Hub:
    def __init__(self, *, queue_size: int):
        self._queue_size = queue_size
        self._by_session: dict[str, set[Watcher]] = {}
        self._closed: DomainError | None = None

    @property
    def watcher_count(self) -> int:
        return sum(len(ws) for ws in self._by_session.values())

    def subscribe(self, session_id: str) -> Watcher:
        if self._closed is not None:
            raise self._closed
        watcher = Watcher(session_id, self._queue_size)
        self._by_session.setdefault(session_id, set()).add(watcher)
        return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        watchers = self._by_session.get(watcher.session_id)
        if watchers is not None:
            watchers.discard(watcher)
            if not watchers:
                del self._by_session[watcher.session_id]

    def publish(self, events: list[SessionEvent]) -> None:
        """Called on the event loop, once per commit, in commit order."""
        for event in events:
            for watcher in tuple(self._by_session.get(event.session_id, ())):
                watcher.offer(event)

    def close(self) -> None:
        """Shutdown: every open watch ends with UNAVAILABLE so clients reconnect elsewhere or later."""
        self._closed = Unavailable("the server is shutting down; resume the watch", reason="SHUTTING_DOWN", retry_after=1.0)
        for watchers in self._by_session.values():
            for watcher in watchers:
                watcher.end(self._closed)
