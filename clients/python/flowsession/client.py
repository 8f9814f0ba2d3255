"""Hand-written client facade over the generated flowsession.v1 stubs.

connect() opens a channel with keepalive settings, Client holds the stubs, FlowsessionError turns a
grpc.RpcError and its google.rpc rich status into plain attributes, and Client.watch() follows a
session's events across UNAVAILABLE failures without gaps or duplicates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from flowsession.v1 import flow_service_pb2_grpc, session_pb2, session_service_pb2, session_service_pb2_grpc

# A watch stream can sit idle for minutes between events; proxies, NATs and load balancers drop
# idle TCP connections silently. Pinging every 60 s keeps the connection alive and a missed ack
# (20 s) turns a dead peer into UNAVAILABLE, which watch() resumes from. max_pings_without_data=0
# lifts the default cap of 2 pings while no data flows (an idle stream sends none), and
# permit_without_calls keeps pinging with no call open. The server permits pings without calls
# and every 30 s (grpc.http2.min_ping_interval_without_data_ms), so 60 s never earns a
# too_many_pings GOAWAY.
KEEPALIVE_OPTIONS: list[tuple[str, object]] = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class FlowsessionError(Exception):
    """A failed RPC with the server's google.rpc error details unpacked."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        field_violations: list[tuple[str, str]] | None = None,
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" ({reason})" if reason else ""))
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}
        self.field_violations = field_violations or []
        self.retry_delay = retry_delay

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> FlowsessionError:
        """Builds the error from a grpc.RpcError that is also a grpc.Call (real or grpc_testing)."""
        code: grpc.StatusCode = err.code()
        message: str = err.details() or ""
        try:
            status = rpc_status.from_call(err)
        except ValueError:
            # The rich status disagrees with the call's code or message (e.g. a proxy rewrote the
            # status); trust the call's own status rather than mask the error.
            status = None
        reason = ""
        metadata: dict[str, str] = {}
        field_violations: list[tuple[str, str]] = []
        retry_delay: float | None = None
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                field_violations = [(v.field, v.description) for v in bad_request.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_delay = retry.retry_delay.ToTimedelta().total_seconds()
        return cls(
            code,
            message,
            reason=reason,
            metadata=metadata,
            field_violations=field_violations,
            retry_delay=retry_delay,
        )


class Client:
    """The generated stubs on one channel, plus watch() with auto-resume."""

    def __init__(self, channel: grpc.Channel, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self._channel = channel
        # Injected so tests can check a server's RetryInfo delay without waiting it out.
        self._sleep = sleep
        self.flows = flow_service_pb2_grpc.FlowServiceStub(channel)
        self.sessions = session_service_pb2_grpc.SessionServiceStub(channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def watch(
        self,
        environment: str,
        session_id: str,
        *,
        after_version: int = 0,
        timeout: float | None = None,
        max_reconnects: int | None = None,
    ) -> Iterator[session_pb2.SessionEvent]:
        """Yields the session's events in version order, each exactly once, until the terminal one.

        On UNAVAILABLE the stream is re-opened after the last version yielded. `timeout` applies to
        each stream attempt. `max_reconnects` caps consecutive re-opens that yield no new event
        (None: unlimited). Raises FlowsessionError for any other failure or when the cap is hit.
        """
        last_version = after_version
        reconnects = 0
        while True:
            # wait_for_ready: a re-open waits for the channel to reconnect, paced by gRPC's own
            # jittered exponential connection backoff, instead of failing fast in a tight loop.
            call = self.sessions.WatchSession(
                session_service_pb2.WatchSessionRequest(
                    environment=environment, session_id=session_id, after_version=last_version
                ),
                timeout=timeout,
                wait_for_ready=True,
            )
            try:
                for response in call:
                    event = response.event
                    # A re-opened stream may repeat what the broken one already delivered.
                    if event.version <= last_version:
                        continue
                    last_version = event.version
                    reconnects = 0
                    yield event
                return
            except grpc.RpcError as err:
                error = FlowsessionError.from_rpc_error(err)
                if error.code is not grpc.StatusCode.UNAVAILABLE:
                    raise error from err
                if max_reconnects is not None and reconnects >= max_reconnects:
                    raise error from err
                reconnects += 1
                if error.retry_delay is not None:
                    self._sleep(error.retry_delay)
            finally:
                # Frees the server's watcher when the caller stops iterating early; a no-op on a
                # stream that already ended.
                call.cancel()


def connect(address: str, *, options: Sequence[tuple[str, object]] = ()) -> Client:
    """Opens an insecure channel to address; `options` are passed after the keepalive defaults."""
    return Client(grpc.insecure_channel(address, options=[*KEEPALIVE_OPTIONS, *options]))
