"""Concurrent conflicting calls on one session: exactly one wins, the rest are refused, versions stay gapless."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc

from flowsession.v1 import session_pb2, session_service_pb2 as spb

from ..support import TIMEOUT, get, new_session, published_flow, report, watch_raw

CALLERS = 48


def _outcomes(calls):
    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(c) for c in calls]
        results = []
        for f in futures:
            try:
                results.append(("ok", f.result(timeout=TIMEOUT)))
            except grpc.RpcError as err:
                results.append((err.code(), err.details()))
    return results


def test_conflicting_terminal_verbs_one_wins(client):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    report(client, sid, "document", "ok")
    ref = dict(environment="live", session_id=sid)
    calls = []
    for i in range(CALLERS):
        kind = i % 3
        if kind == 0:
            calls.append(lambda: client.sessions.AbortSession(spb.AbortSessionRequest(reason="stop", **ref), timeout=TIMEOUT))
        elif kind == 1:
            calls.append(
                lambda: client.sessions.FailSession(spb.FailSessionRequest(error_code="camera", **ref), timeout=TIMEOUT)
            )
        else:
            calls.append(
                lambda: client.sessions.ReportStepResult(
                    spb.ReportStepResultRequest(step_id="liveness", verdict="ok", **ref), timeout=TIMEOUT
                )
            )
    results = _outcomes(calls)
    winners = [r for r in results if r[0] == "ok"]
    losers = [r for r in results if r[0] != "ok"]
    assert len(winners) == 1, results
    assert all(code is grpc.StatusCode.FAILED_PRECONDITION for code, _ in losers), losers
    final = get(client, sid)
    assert final.version == 3 and final.status != session_pb2.SESSION_STATUS_RUNNING
    assert final.status == winners[0][1].session.status
    assert [e.version for e in watch_raw(client, sid, after_version=0)] == [3]


def test_concurrent_reports_of_one_step_advance_once(client):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    request = spb.ReportStepResultRequest(environment="live", session_id=sid, step_id="document", verdict="ok")
    results = _outcomes([lambda: client.sessions.ReportStepResult(request, timeout=TIMEOUT)] * CALLERS)
    assert sum(1 for r in results if r[0] == "ok") == 1
    assert {r[0] for r in results if r[0] != "ok"} == {grpc.StatusCode.FAILED_PRECONDITION}
    assert get(client, sid).version == 2


def test_versions_stay_gapless_under_concurrent_changes_on_many_sessions(client):
    flow_id = published_flow(client)
    ids = [new_session(client, flow_id).session.session_id for _ in range(8)]
    # Each session: its own ordered chain of retries, all chains interleaved across threads.
    def chain(sid: str) -> None:
        report(client, sid, "document", "ok")
        for _ in range(5):
            report(client, sid, "liveness", "retry")
        report(client, sid, "liveness", "ok")

    with ThreadPoolExecutor(max_workers=8) as pool:
        for f in [pool.submit(chain, sid) for sid in ids]:
            f.result(timeout=TIMEOUT)
    for sid in ids:
        events = watch_raw(client, sid, after_version=0)
        assert [e.version for e in events] == [8]
        history = [e.version for e in _history(client, sid)]
        assert history == list(range(2, 9))


def _history(client, sid):
    return watch_raw(client, sid, after_version=1)
