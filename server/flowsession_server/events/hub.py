"""Fan-out of committed events to watchers, each through its own bounded buffer.

A watcher registers *before* it reads its backlog from the store and drops what it already sent,
so together with the log it sees every event once (ARCHITECTURE.md, convention 6). Publishing never
blocks: a watcher whose buffer is full is either sent back to the log (while it is still catching
up, the log has everything) or ended with WATCHER_TOO_SLOW, so a slow client never slows writers or
other watchers, and memory stays bounded.
"""
from __future__ import annotations

import asyncio
import random
from collections import deque
from dataclasses import dataclass
from typing import Callable

from ..domain.errors import DomainError, ResourceExhausted, Unavailable
from ..domain.model import START, LogPosition, SessionEvent

Match = Callable[[SessionEvent], bool]


@dataclass(frozen=True)
class Lost:
    """In a WatchSessions watcher's buffer, in order with its events: events up to ``through`` were
    pruned before this process published them (its change feed fell behind another process's commits
    by more than the retention period). A stream not yet past ``through`` missed some of them."""

    through: LogPosition


class Watcher:
    def __init__(
        self, hub: Hub, index: dict[str, set[Watcher]], key: str, capacity: int, match: Match | None, *, catching_up: bool
    ):
        self._hub = hub
        self.index = index
        self.key = key  # a session id, or an environment for WatchSessions
        self.match = match
        self._capacity = capacity
        self._buffer: deque[SessionEvent | Lost] = deque()
        self._ready = asyncio.Event()
        self._ended: DomainError | None = None
        self._on_end: Callable[[], None] | None = None
        # next_within's idleness: since when it waits, and its one timer (fired early, it re-arms).
        self._waiting_since = 0.0
        self._waiting = False
        self._idle_due = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        # While catching up from the log, an overflow only means "read more from the log".
        self.catching_up = catching_up
        self.overflowed = False
        # Loop time at which the stream's write in progress started, if one is: see Hub.cut_stalled.
        self.sending_since: float | None = None

    @property
    def idle(self) -> bool:
        return not self._buffer

    @property
    def pending(self) -> int:
        """Events buffered for the stream and not sent yet: never more than the queue size."""
        return len(self._buffer)

    def offer(self, event: SessionEvent | Lost) -> None:
        if self._ended is not None or self.overflowed:
            return
        if len(self._buffer) >= self._capacity:
            self._buffer.clear()
            if self.catching_up:
                self.overflowed = True
            else:
                self.end(
                    ResourceExhausted(
                        f"the watcher fell more than {self._capacity} events behind; resume from the last one received",
                        reason="WATCHER_TOO_SLOW",
                    )
                )
            return
        self._buffer.append(event)
        self._ready.set()

    def on_end(self, callback: Callable[[], None]) -> None:
        """``callback`` runs when the watch is ended from outside (to interrupt a blocked send)."""
        self._on_end = callback

    def end(self, error: DomainError) -> None:
        """Ends the watch: ``next()`` raises ``error`` as soon as it is called."""
        if self._ended is not None:
            return
        self._ended = error
        self._buffer.clear()
        self._ready.set()
        if self._on_end is not None:
            self._on_end()

    @property
    def ended(self) -> DomainError | None:
        return self._ended

    def take_overflow(self) -> bool:
        """True (once) if the buffer overflowed while catching up: the caller re-reads the log."""
        overflowed, self.overflowed = self.overflowed, False
        return overflowed

    async def wait_pending(self) -> None:
        """Returns once an event is buffered (or the watch ended), without taking it."""
        while not self._buffer and self._ended is None:
            self._ready.clear()
            await self._ready.wait()

    async def next_within(self, idle: float) -> SessionEvent | Lost | None:
        """The next event (or Lost), or None after ``idle`` seconds of waiting for one (a heartbeat is due).

        One timer per watcher, armed when a wait starts and re-armed only when it fires early: a timeout
        per event (a timer created, pushed on the loop's heap and cancelled, per event and stream) cost
        about a tenth of each delivery."""
        loop = asyncio.get_running_loop()
        self._waiting_since = loop.time()
        self._idle_due = False
        self._waiting = True
        try:
            while True:
                if self._ended is not None:
                    raise self._ended
                if self._buffer:
                    return self._buffer.popleft()
                if self._idle_due:
                    return None
                if self._timer is None:
                    self._arm(loop, self._waiting_since + idle, idle)
                self._ready.clear()
                await self._ready.wait()
        finally:
            self._waiting = False

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float, idle: float) -> None:
        self._timer_when = when
        self._timer = loop.call_at(when, self._on_timer, loop, idle)

    def _on_timer(self, loop: asyncio.AbstractEventLoop, idle: float) -> None:
        self._timer = None
        if not self._waiting:
            return  # the next wait arms it again
        due = self._waiting_since + idle
        if due <= self._timer_when:
            self._idle_due = True
            self._ready.set()
        else:  # a newer wait started after this timer was armed
            self._arm(loop, due, idle)

    def close(self) -> None:
        """No more events: the stream is over (it still counts against the limit until ``release``)."""
        self._hub.unsubscribe(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # The callback (the stream's sender) holds this watcher: a cycle per stream, freed only by a
        # rare full collection, would keep the stream's task and call state alive until then.
        self._on_end = None

    def release(self) -> None:
        """The stream's call is over, in gRPC too: its place under the watcher limit is free. (A stream
        ended while its client stopped reading lasts until that client reads, cancels or disconnects:
        its status waits behind the message gRPC could not send, which that call holds meanwhile.)"""
        self.close()
        self._hub.release(self)


class Hub:
    def __init__(self, *, queue_size: int, max_watchers: int):
        self._queue_size = queue_size
        self._max_watchers = max_watchers
        self._by_session: dict[str, set[Watcher]] = {}
        self._by_environment: dict[str, set[Watcher]] = {}
        self._count = 0  # subscribed watchers
        self._held: set[Watcher] = set()  # every watcher not yet released: what the limit counts
        self._closed: DomainError | None = None
        # The position of the last event published: every event up to it has been offered to every watcher.
        self.high_water: LogPosition = START

    @property
    def watcher_count(self) -> int:
        """Watchers that events go to."""
        return self._count

    @property
    def open_streams(self) -> int:
        """Watch streams whose call is not over: what --max-watchers limits."""
        return len(self._held)

    def watchers(self) -> list[Watcher]:
        return [w for index in (self._by_session, self._by_environment) for ws in index.values() for w in ws]

    def watch_session(self, session_id: str) -> Watcher:
        return self._add(self._by_session, session_id, None, catching_up=False)

    def watch_environment(self, environment: str, match: Match, *, catching_up: bool) -> Watcher:
        return self._add(self._by_environment, environment, match, catching_up=catching_up)

    def _add(self, index: dict[str, set[Watcher]], key: str, match: Match | None, *, catching_up: bool) -> Watcher:
        if self._closed is not None:
            raise self._closed
        if len(self._held) >= self._max_watchers:
            raise ResourceExhausted(
                f"this server already has {self._max_watchers} open watch streams",
                reason="TOO_MANY_WATCHERS",
                retry_after=round(random.uniform(1.0, 5.0), 3),
                metadata={"max_watchers": str(self._max_watchers)},
            )
        watcher = Watcher(self, index, key, self._queue_size, match, catching_up=catching_up)
        index.setdefault(key, set()).add(watcher)
        self._count += 1
        self._held.add(watcher)
        return watcher

    def release(self, watcher: Watcher) -> None:
        self._held.discard(watcher)

    def unsubscribe(self, watcher: Watcher) -> None:
        index = watcher.index
        watchers = index.get(watcher.key)
        if watchers is not None and watcher in watchers:
            watchers.discard(watcher)
            self._count -= 1
            if not watchers:
                del index[watcher.key]

    def publish(self, events: list[SessionEvent]) -> None:
        """Called on the event loop in cursor (commit) order."""
        for event in events:
            for watcher in tuple(self._by_session.get(event.session_id, ())):
                watcher.offer(event)
            for watcher in tuple(self._by_environment.get(event.session.environment, ())):
                if watcher.match is None or watcher.match(event):
                    watcher.offer(event)
        if events and events[-1].cursor > self.high_water.cursor:  # events come in cursor order
            self.high_water = events[-1].position

    def lost(self, through: LogPosition) -> None:
        """Events up to ``through`` can no longer be published (see Lost): every WatchSessions watcher
        is told, in order with its events. (A WatchSession finds a missing version in the log itself.)"""
        for watchers in self._by_environment.values():
            for watcher in tuple(watchers):
                watcher.offer(Lost(through))
        if through.cursor > self.high_water.cursor:
            self.high_water = through

    def cut_stalled(self, now: float, limit: float) -> int:
        """Ends, with WATCHER_TOO_SLOW, every watcher whose write has been blocked for ``limit`` seconds
        (its client stopped reading): the queue counts events, but each blocked write holds its message
        serialized, in Python and in gRPC core, for as long as it waits. Returns how many it ended."""
        stalled = [w for w in self.watchers() if w.sending_since is not None and now - w.sending_since >= limit]
        for watcher in stalled:
            watcher.end(
                ResourceExhausted(
                    f"the client has read nothing of this stream for {limit:g} s; resume from the last event received",
                    reason="WATCHER_TOO_SLOW",
                )
            )
        return len(stalled)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def close(self) -> None:
        """Shutdown: every open watch ends with UNAVAILABLE so clients resume elsewhere or later."""
        self._closed = Unavailable.shutting_down("resume the watch")
        for index in (self._by_session, self._by_environment):
            for watchers in list(index.values()):
                for watcher in list(watchers):
                    watcher.end(self._closed)
