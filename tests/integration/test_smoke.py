from flowsession.v1 import session_pb2, session_service_pb2 as spb

from ..support import TIMEOUT, new_session, published_flow


def test_session_runs_to_completion(client):
    flow_id = published_flow(client)
    created = new_session(client, flow_id)
    sid = created.session.session_id
    for step_id in ("document", "liveness"):
        session = client.sessions.ReportStepResult(
            spb.ReportStepResultRequest(environment="live", session_id=sid, step_id=step_id, verdict="ok"), timeout=TIMEOUT
        ).session
    assert session.status == session_pb2.SESSION_STATUS_COMPLETED
    assert session.version == 3
