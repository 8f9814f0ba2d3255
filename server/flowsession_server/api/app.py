"""Server bootstrap: wires store, hub, expiry scheduler, servicers, health and reflection."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from flowsession.v1 import flow_service_pb2, flow_service_pb2_grpc, session_service_pb2, session_service_pb2_grpc

from ..clock import Clock, SystemClock
from ..config import Settings
from ..events.feed import Feed
from ..events.hub import Hub
from ..expiry import ExpiryScheduler
from ..retention import Retention
from ..store.store import Store
from . import errors
from .flow_service import FlowService
from .health import Health
from .reflection import Reflection
from .session_service import SessionService
from .streams import CLIENT_GONE_FILTER, GRPC_AIO_LOGGER, Streams, WatchSettings

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    flow_service_pb2.DESCRIPTOR.services_by_name["FlowService"].full_name,
    session_service_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
)

# Clients ping idle streams every 60 s (flowsession.client.KEEPALIVE_OPTIONS); allowing one every 30 s
# leaves room, so no client gets a too_many_pings GOAWAY. The server pings too, to find dead peers (and
# free their watcher slots); gRPC core waits ping_timeout_ms for the ack (1 minute unless set), not
# keepalive_timeout_ms.
SERVER_OPTIONS: Sequence[tuple[str, int]] = (
    ("grpc.keepalive_time_ms", 120_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.ping_timeout_ms", 20_000),
    # gRPC's default SO_REUSEPORT let a second server bind an address in use, and the kernel then split
    # connections between the two (an old process left running served clients unnoticed).
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
    ("grpc.http2.max_ping_strikes", 2),
    # gRPC core cancels (bare CANCELLED, before any handler runs) calls that arrive faster than the
    # aio server picks them up once 1,000 are pending (all past 3,000): a reconnect storm of thousands of
    # watchers lost two thirds of its re-opens in the bench. Room for every watcher --max-watchers allows;
    # the server's own shedding (SERVER_BUSY + RetryInfo) then paces them.
    ("grpc.server.max_pending_requests", 20_000),
    ("grpc.server.max_pending_requests_hard_limit", 40_000),
    # Calls still waiting to be picked up after this many seconds are cancelled too (default 30).
    ("grpc.server_max_unrequested_time_in_server", 120),
)


# At shutdown, calls are answered SHUTTING_DOWN until none has come for Settings.shutdown_drain seconds,
# for at most DRAIN_LIMIT seconds (clients that keep calling cannot hold a stop) and half the grace; see
# errors.Admission.
DRAIN_LIMIT = 2.0


class CannotListen(Exception):
    """gRPC could not bind the address (not this host's, a port in use without SO_REUSEPORT, ...)."""


class FlowsessionServer:
    """A running server. ``stop()`` is the graceful shutdown that SIGTERM triggers."""

    def __init__(self, settings: Settings, clock: Clock):
        self.settings = settings
        self.clock = clock
        self.hub = Hub(queue_size=settings.watch_queue, max_watchers=settings.max_watchers)
        self.store = Store(settings.db_path, clock, synchronous=settings.synchronous, read_threads=settings.read_threads)
        self.expiry = ExpiryScheduler(self.store, clock)
        self.feed = Feed(
            self.store, [self.hub.publish, self.expiry.observe], poll_interval=settings.feed_poll, on_lost=self.hub.lost
        )
        self.retention = Retention(self.store, settings.event_retention)
        self.health = Health()
        self._stall_sweeper: asyncio.Task[None] | None = None
        self.admission = errors.Admission()
        self.reflection = Reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME))
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        self.port = 0
        self._stopped = asyncio.Event()

    def _on_health(self, _writable: bool) -> None:
        asyncio.ensure_future(self._publish_health())

    async def _publish_health(self) -> None:
        serving = self.store.writable and self.expiry.running and not self._stopped.is_set()
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def start(self, address: str) -> int:
        logging.getLogger(GRPC_AIO_LOGGER).addFilter(CLIENT_GONE_FILTER)  # once per process: the same filter
        await self.store.open(self.feed.on_commit, self._on_health)
        await self.feed.start()
        # "Now" for new watchers is the log's head at start, not the beginning of the log.
        self.hub.high_water = self.feed.head_at_start
        self.expiry.start().add_done_callback(self._expiry_ended)
        self.retention.start()
        self._stall_sweeper = asyncio.create_task(self._cut_stalled_watchers(), name="flowsession-stalled-watchers")
        streams = Streams(
            self.store,
            self.hub,
            self.clock,
            WatchSettings(heartbeat=self.settings.watch_heartbeat, max_opening=self.settings.max_opening_watchers),
        )
        errors.add_servicer(
            flow_service_pb2_grpc.add_FlowServiceServicer_to_server,
            FlowService(self.store, self.settings.environments, self.admission),
            self.server,
        )
        errors.add_servicer(
            session_service_pb2_grpc.add_SessionServiceServicer_to_server,
            SessionService(self.store, streams, self.settings.environments, self.admission),
            self.server,
        )
        errors.add_servicer(health_pb2_grpc.add_HealthServicer_to_server, self.health, self.server)
        errors.add_servicer(
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server, self.reflection, self.server
        )
        # Bound last: the port accepts connections only once calls can be served (a TCP probe, or a
        # client connecting during a long start, would otherwise find it open and hang).
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError as exc:
            raise CannotListen(f"cannot listen on {address}: {exc}") from exc
        await self.server.start()
        await self._publish_health()
        return self.port

    async def _cut_stalled_watchers(self) -> None:
        limit = self.settings.watch_write_timeout
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(limit / 4)  # a period: a stalled stream is cut within 1.25 x the limit
            cut = self.hub.cut_stalled(loop.time(), limit)
            if cut:
                log.info("cut %d watch streams whose clients read nothing for %g s", cut, limit)

    def _expiry_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("expiry scheduler stopped", exc_info=task.exception())
        asyncio.ensure_future(self._publish_health())

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, end watch streams with UNAVAILABLE, let in-flight calls finish, commit, close."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.admission.close()
        grace = self.settings.shutdown_grace if grace is None else grace
        limit = min(grace / 2, DRAIN_LIMIT)
        started = time.monotonic()
        await asyncio.gather(
            self.admission.drain(quiet=self.settings.shutdown_drain, limit=limit), self.health.close(tell_timeout=limit)
        )
        # Streams end only now, right before gRPC's GOAWAY: ending thousands keeps the loop busy (no
        # waiting call is picked up meanwhile), and their re-opens, RetryInfo 1 s later, must find this
        # server gone, not queued in it to be cancelled.
        self.hub.close()
        self.reflection.close()
        remaining = max(0.0, grace - (time.monotonic() - started))
        # A write still waiting for another process's lock is refused before the grace ends, with
        # time left to send that answer; else gRPC would cancel the call and the write land later.
        self.store.stop_waiting_by(time.monotonic() + remaining - min(0.5, remaining / 4))
        await self.server.stop(remaining)
        if self._stall_sweeper is not None:
            self._stall_sweeper.cancel()
            await asyncio.gather(self._stall_sweeper, return_exceptions=True)
        await self.retention.stop()
        await self.expiry.stop()
        await self.feed.stop()
        await self.store.close()


async def build_server(settings: Settings, address: str, *, clock: Clock | None = None) -> tuple[FlowsessionServer, int]:
    """Starts a server on ``address`` (port 0 picks a free one); returns it with the bound port."""
    server = FlowsessionServer(settings, clock or SystemClock())
    try:
        port = await server.start(address)
    except BaseException:
        await server.stop(0)  # what started (store, feed, expiry, retention) stops again
        raise
    return server, port
