"""The ceiling of the stack: a bare grpc.aio server with no proto, no store and no domain.

Methods (bytes in, bytes out, generic handlers):
  /bench.Bare/Echo     unary: returns the request.
  /bench.Bare/Publish  unary: request = a key; pushes one message, stamped with the wall clock (µs,
                       8 bytes little-endian, then padding), onto the in-memory queue of every stream
                       watching that key: the bare analogue of "commit, then fan out to watchers".
  /bench.Bare/PublishAll unary: pushes one stamped message onto every stream's queue at once: the bare
                       analogue of an expiry storm (one batch committed, every watcher gets an event).
  /bench.Bare/Watch    server stream: request = a key; first a hello message (stamp 0) once the stream
                       is registered, then every message published to the key.

Run as ``python -m bench.bare_server --address 127.0.0.1:0``; prints ``listening on HOST:PORT``;
SIGTERM stops it. Its process gets flowsession's garbage-collector tuning, so the ceiling is like-for-like.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import time
from typing import AsyncIterator

import grpc

# The same garbage-collector tuning as `flowsession serve` (freeze start-up, full collections 100x rarer):
# without it a full collection with 10,000 streams open paused this server ~300 ms, inside the storm.
from flowsession_server.cli import tune_gc

SERVICE = "bench.Bare"
_STAMP = struct.Struct("<q")


def _identity(data: bytes) -> bytes:
    return data


class Bare:
    def __init__(self, payload: int):
        self._padding = b"x" * payload
        self._queues: dict[bytes, set[asyncio.Queue[bytes]]] = {}

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def publish(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        message = _STAMP.pack(time.time_ns() // 1000) + self._padding
        queues = self._queues.get(request, ())
        for q in queues:
            q.put_nowait(message)
        return _STAMP.pack(len(queues))

    async def publish_all(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        message = _STAMP.pack(time.time_ns() // 1000) + self._padding
        count = 0
        for queues in self._queues.values():
            for q in queues:
                q.put_nowait(message)
            count += len(queues)
        return _STAMP.pack(count)

    async def watch(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        q: asyncio.Queue[bytes] = asyncio.Queue()
        self._queues.setdefault(request, set()).add(q)
        try:
            yield _STAMP.pack(0) + self._padding
            while True:
                yield await q.get()
        finally:
            queues = self._queues.get(request)
            if queues is not None:
                queues.discard(q)
                if not queues:
                    del self._queues[request]

    def handler(self) -> grpc.GenericRpcHandler:
        kw = {"request_deserializer": _identity, "response_serializer": _identity}
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Echo": grpc.unary_unary_rpc_method_handler(self.echo, **kw),
                "Publish": grpc.unary_unary_rpc_method_handler(self.publish, **kw),
                "PublishAll": grpc.unary_unary_rpc_method_handler(self.publish_all, **kw),
                "Watch": grpc.unary_stream_rpc_method_handler(self.watch, **kw),
            },
        )


async def serve(address: str, payload: int) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Bare(payload).handler(),))
    port = server.add_insecure_port(address)
    await server.start()
    tune_gc()  # as flowsession's serve() does, right after its server started
    print(f"listening on {address.rsplit(':', 1)[0]}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_server")
    parser.add_argument("--address", default="127.0.0.1:0")
    parser.add_argument("--payload", type=int, default=400, help="padding bytes per streamed message")
    args = parser.parse_args()
    asyncio.run(serve(args.address, args.payload))


if __name__ == "__main__":
    main()
