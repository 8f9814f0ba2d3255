"""grpc's health servicer, except that its Watch streams end when the server shuts down.

A health Watch never ends by itself, and clients with gRPC client-side health checking keep one open per
connection, so each would hold a SIGTERM for the whole grace period. Here shutdown first sends every
watcher NOT_SERVING, then ends its stream with UNAVAILABLE / SHUTTING_DOWN, as the session watch streams
end, and the client's channel moves on.
"""
from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from ..domain.errors import Unavailable
from . import errors

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _Telling:
    """The watch's context; notes when NOT_SERVING has been written after shutdown began."""

    def __init__(self, context: grpc.aio.ServicerContext, servicer: Health):
        self._context = context
        self._servicer = servicer
        self.told = asyncio.Event()

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(message)
        if self._servicer.closing and message.status == NOT_SERVING:
            self.told.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class Health(health.aio.HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self.closing = False
        self._watches: dict[asyncio.Task[None], _Telling] = {}

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        await errors.refuse_undecodable(request, context)
        return await super().Check(request, context)

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        """Every service's status. grpcio's servicer leaves this newer method of the protocol out: it
        answered UNIMPLEMENTED, "Unexpected NotImplementedError", and logged a traceback per call."""
        await errors.refuse_undecodable(request, context)
        statuses = self._server_status  # what Check answers from (the base class keeps it)
        return health_pb2.HealthListResponse(
            statuses={service: health_pb2.HealthCheckResponse(status=status) for service, status in statuses.items()}
        )

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        await errors.refuse_undecodable(request, context)
        if not self.closing:
            telling = _Telling(context, self)
            watch = asyncio.ensure_future(super().Watch(request, telling))
            self._watches[watch] = telling
            try:
                await watch
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise  # the client went away
            finally:
                del self._watches[watch]
        else:  # opened while shutting down
            await context.write(health_pb2.HealthCheckResponse(status=NOT_SERVING))
        await context.abort_with_status(errors.status_for(Unavailable.shutting_down()))

    async def close(self, tell_timeout: float) -> None:
        """Every service NOT_SERVING from now on; each watcher is told (waiting at most ``tell_timeout``
        seconds for that), then its stream ends."""
        self.closing = True
        await self.enter_graceful_shutdown()
        if self._watches:
            told = [asyncio.ensure_future(t.told.wait()) for t in self._watches.values()]
            # A watch of an unknown service is never told, nor one whose client does not read.
            _, late = await asyncio.wait(told, timeout=tell_timeout)
            for waiting in late:
                waiting.cancel()
        for watch in list(self._watches):
            watch.cancel()
