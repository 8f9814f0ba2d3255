"""Durability: every answered change survives SIGKILL of the server mid-traffic."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from flowsession.client import connect
from flowsession.v1 import session_pb2

from ..support import ServerProcess, first_events, get, new_session, published_flow, report


def test_sigkill_mid_traffic_loses_no_acknowledged_change(tmp_path):
    db = tmp_path / "flowsession.db"
    proc = ServerProcess(db)
    acked: dict[str, int] = {}  # session_id -> highest version the server answered with
    lock = threading.Lock()
    enough = threading.Event()
    try:
        with connect(proc.address) as client:
            flow_id = published_flow(client)

            def traffic() -> None:
                try:
                    while True:
                        sid = new_session(client, flow_id).session.session_id
                        with lock:
                            acked[sid] = 1
                        session = report(client, sid, "document", "ok")
                        with lock:
                            acked[sid] = session.version
                            if len(acked) >= 60:
                                enough.set()
                except grpc.RpcError:
                    return  # the server died under us; what was answered before must be there

            with ThreadPoolExecutor(max_workers=6) as pool:
                workers = [pool.submit(traffic) for _ in range(6)]
                assert enough.wait(60), "traffic did not get going"
                proc.kill()
                for w in workers:
                    w.result(timeout=30)
    finally:
        proc.close()

    restarted = ServerProcess(db)
    try:
        with connect(restarted.address) as client:
            for sid, version in acked.items():
                session = get(client, sid)
                assert session.version >= version, (sid, session.version, version)
                assert session.status == session_pb2.SESSION_STATUS_RUNNING
                assert [e.version for e in first_events(client, sid, 1)] == [session.version]
                assert [e.version for e in first_events(client, sid, session.version - 1, after_version=1)] == list(
                    range(2, session.version + 1)
                )
            # The restarted server goes on where the log ends.
            sid = next(iter(acked))
            if get(client, sid).current_step_id == "liveness":
                assert report(client, sid, "liveness", "ok").status == session_pb2.SESSION_STATUS_COMPLETED
    finally:
        restarted.terminate()
        restarted.close()
