"""Client and server keepalive settings must agree, or idle watch streams get too_many_pings GOAWAYs."""
from flowsession.client import KEEPALIVE_OPTIONS
from flowsession_server.api.app import SERVER_OPTIONS


def test_client_pings_no_more_often_than_the_server_allows():
    client = dict(KEEPALIVE_OPTIONS)
    server = dict(SERVER_OPTIONS)
    assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    # Idle streams have no data in flight: the server must accept pings then, and the client must send them.
    assert server["grpc.keepalive_permit_without_calls"] == 1
    assert client["grpc.keepalive_permit_without_calls"] == 1
    assert client["grpc.http2.max_pings_without_data"] == 0
    # A dead peer is noticed well within an hour-long watch. gRPC core waits grpc.http2.ping_timeout_ms
    # (1 minute unless set) for the ack, not keepalive_timeout_ms: both must say the same.
    assert client["grpc.http2.ping_timeout_ms"] == client["grpc.keepalive_timeout_ms"]
    assert client["grpc.keepalive_time_ms"] + client["grpc.http2.ping_timeout_ms"] <= 120_000
    # The server's pings find dead clients (and free their watcher slots) as soon.
    assert server["grpc.http2.ping_timeout_ms"] == server["grpc.keepalive_timeout_ms"]
