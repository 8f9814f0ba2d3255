"""Domain -> proto conversion of sessions and watch events (api/convert.py): every field, presence of the
optional messages, and the same bytes whether an event or an RPC answer converts a session first."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

from flowsession.v1 import flow_pb2, session_pb2
from flowsession.v1 import session_service_pb2 as pb
from flowsession_server.api import convert
from flowsession_server.domain.model import (
    EventType,
    Session,
    SessionError,
    SessionEvent,
    SessionOutcome,
    SessionStatus,
    StepResult,
)

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
EPOCH = "0123456789abcdef"


def _session(session_id: str, **changes: object) -> Session:
    fields: dict[str, object] = dict(
        session_id=session_id, flow_id="flw_1", flow_version=3, environment="live", status=SessionStatus.RUNNING,
        current_step_id="selfie", current_step_type="liveness", create_time=T0, update_time=T0 + timedelta(seconds=5),
        expire_time=T0 + timedelta(hours=24), version=2,
    )  # fmt: skip
    fields.update(changes)
    return Session(**fields)  # type: ignore[arg-type]


def _us(ts: object) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1000  # type: ignore[attr-defined]


def test_every_field_of_a_full_session() -> None:
    ended = T0 + timedelta(minutes=3, microseconds=7)
    s = _session(
        "ses_full", status=SessionStatus.COMPLETED, outcome=SessionOutcome.REJECTED,
        last_step=StepResult("selfie", "liveness", "fail", T0 + timedelta(minutes=2)),
        metadata={"customer": "c-1", "channel": "web"}, redirect_url="https://example.com/back", state="xyz",
        input={"country": "FR", "age": 42, "tags": ["a", "b"], "nested": {"ok": True}}, end_time=ended,
    )  # fmt: skip
    m = convert.session_pb(s)
    assert (m.session_id, m.flow_id, m.flow_version, m.environment, m.version) == ("ses_full", "flw_1", 3, "live", 2)
    assert m.status == session_pb2.SESSION_STATUS_COMPLETED and m.outcome == flow_pb2.SESSION_OUTCOME_REJECTED
    assert (m.current_step_id, m.current_step_type, m.redirect_url, m.state) == ("selfie", "liveness", "https://example.com/back", "xyz")
    assert dict(m.metadata) == {"customer": "c-1", "channel": "web"}
    assert convert.struct_to_dict(m.input) == {"country": "FR", "age": 42, "tags": ["a", "b"], "nested": {"ok": True}}
    assert [_us(t) for t in (m.create_time, m.update_time, m.expire_time, m.end_time)] == [
        convert.to_us(t) for t in (s.create_time, s.update_time, s.expire_time, ended)
    ]
    assert (m.last_step.step_id, m.last_step.step_type, m.last_step.verdict) == ("selfie", "liveness", "fail")
    assert _us(m.last_step.report_time) == convert.to_us(T0 + timedelta(minutes=2))
    assert not m.HasField("error")


def test_optional_messages_are_present_exactly_when_set() -> None:
    running = convert.session_pb(_session("ses_running"))
    assert not running.HasField("last_step") and not running.HasField("end_time") and not running.HasField("error")
    assert not running.metadata and not running.input.fields
    # An ERROR session whose error has only empty fields still says it has an error.
    failed = convert.session_pb(_session("ses_failed", status=SessionStatus.ERROR, error=SessionError("", ""), end_time=T0))
    assert failed.HasField("error") and failed.HasField("end_time")


def test_event_responses_carry_the_event_and_match_the_rpc_answer_whichever_converts_first() -> None:
    first_event = _session("ses_a", status=SessionStatus.EXPIRED, end_time=T0 + timedelta(hours=24), version=3)
    first_answer = _session("ses_b", version=5)
    answer_b = convert.session_pb(first_answer)
    for s in (first_event, first_answer):
        event = SessionEvent(s.session_id, s.version, EventType.EXPIRED, s.update_time, s, cursor=4711, tag="0a1b2c3d")
        for kind in (pb.WatchSessionResponse, pb.WatchSessionsResponse):
            r = convert.event_response(kind, event, EPOCH)
            assert r.HasField("event") and not r.HasField("heartbeat")
            assert (r.event.version, r.event.cursor) == (s.version, f"{EPOCH}-{4711:016x}-0a1b2c3d")
            assert r.event.type == session_pb2.SESSION_EVENT_TYPE_EXPIRED
            assert _us(r.event.event_time) == convert.to_us(s.update_time)
            assert r.event.session.SerializeToString() == convert.session_pb(s).SerializeToString()
    assert convert.session_pb(first_answer) is answer_b  # kept, not rebuilt


def test_kept_messages_are_bounded_by_count_and_by_bytes() -> None:
    kept = convert.Kept(capacity=3, max_bytes=10_000)
    small = [session_pb2.Session(session_id=f"s{i}") for i in range(5)]
    for i, message in enumerate(small):
        kept.keep(i, message)
    assert len(kept) == 3 and kept.get(0) is None and kept.get(4) is small[4]  # the oldest went first
    big = session_pb2.Session(state="x" * 6_000)
    kept.keep("big1", big)
    kept.keep("big2", big)  # 12 KB: the older big one and the small ones go
    assert kept.get("big1") is None and kept.get("big2") is big and len(kept) == 1
    assert kept.kept_bytes == big.ByteSize()
    huge = session_pb2.Session(state="y" * 20_000)
    kept.keep("huge", huge)  # over the budget alone: kept (it is being fanned out), the rest goes
    assert len(kept) == 1 and kept.get("huge") is huge
    serialized = huge.SerializeToString()  # what watch streams keep: weighed by its length
    kept.keep("huge", serialized)
    assert kept.get("huge") is serialized and kept.kept_bytes == len(serialized)
