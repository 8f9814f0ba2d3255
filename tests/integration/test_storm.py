"""Reconnect storms: excess opens are shed with UNAVAILABLE + RetryInfo, and every watcher gets its stream."""
from __future__ import annotations

import asyncio

import grpc

from flowsession.client import FlowsessionError, connect
from flowsession.v1 import session_service_pb2 as spb, session_service_pb2_grpc

from ..support import TIMEOUT, ServerThread, new_session, published_flow, settings_for

# More simultaneous opens than gRPC core's default pending-call limit (1,000): none may be CANCELLED.
WATCHERS = 2500


def test_a_storm_of_opens_is_shed_with_retry_info_and_all_streams_come_back(tmp_path):
    server = ServerThread(settings_for(tmp_path, max_opening_watchers=4))
    try:
        with connect(server.address) as client:
            flow_id = published_flow(client)
            ids = [new_session(client, flow_id).session.session_id for _ in range(20)]
        shed: list[FlowsessionError] = []

        async def one(stub, session_id: str) -> int:
            while True:
                call = stub.WatchSession(spb.WatchSessionRequest(environment="live", session_id=session_id), timeout=TIMEOUT)
                try:
                    async for response in call:
                        call.cancel()
                        return response.event.version
                except grpc.aio.AioRpcError as err:
                    error = FlowsessionError.from_rpc_error(err)
                    assert error.code is grpc.StatusCode.UNAVAILABLE, error  # never a bare CANCELLED
                    assert error.reason == "SERVER_BUSY" and error.retry_delay is not None
                    shed.append(error)
                    await asyncio.sleep(error.retry_delay)  # the server's RetryInfo paces the retry

        async def storm() -> list[int]:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = session_service_pb2_grpc.SessionServiceStub(channel)
                return await asyncio.gather(*(one(stub, ids[i % len(ids)]) for i in range(WATCHERS)))

        versions = asyncio.run(asyncio.wait_for(storm(), 60))
        assert versions == [1] * WATCHERS  # every watcher got its stream and its current state
        assert shed, "with 4 opening slots, some of the simultaneous opens must have been shed"
        assert all(0 < e.retry_delay <= 0.5 for e in shed)
    finally:
        server.stop()
