"""grpc's reflection servicer, except that its streams end when the server shuts down.

A reflection stream lasts as long as its client keeps it (a REPL-style tool keeps one for its whole
session), so an open one held a SIGTERM for the whole grace period and was then cut off with a bare
error. Here shutdown ends each with UNAVAILABLE / SHUTTING_DOWN, as the watch streams end.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from ..domain.errors import Unavailable
from . import errors


class Reflection(reflection.aio.ReflectionServicer):  # type: ignore[name-defined, misc]
    def __init__(self, service_names: tuple[str, ...]):
        super().__init__(service_names)
        self._closed = asyncio.Event()

    async def ServerReflectionInfo(  # type: ignore[override]
        self, request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        answers = super().ServerReflectionInfo(_decoded(request_iterator, context), context).__aiter__()
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            while True:
                answer = asyncio.ensure_future(answers.__anext__())
                await asyncio.wait((answer, closed), return_when=asyncio.FIRST_COMPLETED)
                if not answer.done():
                    answer.cancel()
                    await context.abort_with_status(errors.status_for(Unavailable.shutting_down()))
                try:
                    yield answer.result()
                except StopAsyncIteration:
                    return
        finally:
            closed.cancel()

    def close(self) -> None:
        """Shutdown: every open stream, and every one opened from now on, ends with SHUTTING_DOWN."""
        self._closed.set()


async def _decoded(
    requests: AsyncIterable[reflection_pb2.ServerReflectionRequest], context: grpc.aio.ServicerContext
) -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
    async for request in requests:
        await errors.refuse_undecodable(request, context)
        yield request
