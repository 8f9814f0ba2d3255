"""The hub's watchers: waiting for the next event with a heartbeat deadline."""
from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

from flowsession_server.domain.errors import ResourceExhausted
from flowsession_server.events.hub import Hub

IDLE = 0.2  # seconds


def event() -> Any:
    return object()  # only the watcher's buffer sees it: any object stands for an event


def test_a_buffered_event_is_returned_without_waiting() -> None:
    async def run() -> None:
        watcher = Hub(queue_size=10, max_watchers=10).watch_session("s")
        first = event()
        watcher.offer(first)
        assert await asyncio.wait_for(watcher.next_within(IDLE), IDLE / 2) is first
        watcher.close()

    asyncio.run(run())


def test_idle_is_counted_from_the_start_of_each_wait_not_the_first() -> None:
    """The timer armed by one wait fires during the next one: it must wait out that wait's own interval."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        watcher = Hub(queue_size=10, max_watchers=10).watch_session("s")
        first = event()
        loop.call_later(IDLE / 2, watcher.offer, first)
        assert await watcher.next_within(IDLE) is first
        started = loop.time()
        assert await watcher.next_within(IDLE) is None
        assert loop.time() - started >= IDLE - 1e-3
        watcher.close()

    asyncio.run(run())


def test_an_event_arriving_in_the_wait_comes_before_the_heartbeat() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        watcher = Hub(queue_size=10, max_watchers=10).watch_session("s")
        assert await watcher.next_within(IDLE) is None
        late = event()
        loop.call_later(IDLE / 2, watcher.offer, late)
        assert await watcher.next_within(IDLE) is late
        watcher.close()

    asyncio.run(run())


def test_a_closed_watcher_is_not_held_by_its_heartbeat_timer() -> None:
    async def run() -> weakref.ref:
        loop = asyncio.get_running_loop()
        watcher = Hub(queue_size=10, max_watchers=10).watch_session("s")
        first = event()
        loop.call_soon(watcher.offer, first)
        assert await watcher.next_within(3600) is first  # the wait armed an hour's timer, still pending
        watcher.close()
        gone = weakref.ref(watcher)
        del watcher
        gc.collect()
        return gone

    assert asyncio.run(run())() is None


def test_a_closed_watcher_holds_its_place_under_the_limit_until_released() -> None:
    """A stream the server ended lasts in gRPC until its client reads the end: until then it holds what
    it was sending, so it counts against --max-watchers, though no event goes to it any more."""
    hub = Hub(queue_size=10, max_watchers=1)
    watcher = hub.watch_environment("live", lambda e: True, catching_up=False)
    watcher.close()
    assert (hub.watcher_count, hub.open_streams) == (0, 1)
    try:
        hub.watch_session("s")
    except ResourceExhausted as refused:
        assert refused.reason == "TOO_MANY_WATCHERS"
    else:
        raise AssertionError("a watcher beyond the limit was admitted")
    watcher.release()
    watcher.release()  # once is enough; again changes nothing
    assert hub.open_streams == 0
    hub.watch_session("s").release()
    assert (hub.watcher_count, hub.open_streams) == (0, 0)
