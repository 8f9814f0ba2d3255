"""Proto <-> domain conversion. No rules here: only shapes."""
from __future__ import annotations

from collections import OrderedDict
from datetime import datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from flowsession.v1 import flow_pb2, session_pb2

from ..domain.errors import Violations
from ..store.codec import to_us
from ..domain.model import (
    DEFAULT_EXECUTION_TIMEOUT,
    MAX_EXECUTION_TIMEOUT,
    MIN_EXECUTION_TIMEOUT,
    EventType,
    Flow,
    FlowGraph,
    FlowVersion,
    FlowVersionState,
    Session,
    SessionEvent,
    SessionOutcome,
    SessionStatus,
    Step,
)

_OUTCOME_TO_PB = {
    SessionOutcome.UNSPECIFIED: flow_pb2.SESSION_OUTCOME_UNSPECIFIED,
    SessionOutcome.ACCEPTED: flow_pb2.SESSION_OUTCOME_ACCEPTED,
    SessionOutcome.REJECTED: flow_pb2.SESSION_OUTCOME_REJECTED,
}
_OUTCOME_FROM_PB = {v: k for k, v in _OUTCOME_TO_PB.items()}
STATUS_TO_PB = {s: session_pb2.SessionStatus.Value(f"SESSION_STATUS_{s.value}") for s in SessionStatus}
STATUS_FROM_PB = {v: k for k, v in STATUS_TO_PB.items()}
_EVENT_TO_PB = {e: session_pb2.SessionEventType.Value(f"SESSION_EVENT_TYPE_{e.value}") for e in EventType}
_STATE_TO_PB = {
    FlowVersionState.DRAFT: flow_pb2.FLOW_VERSION_STATE_DRAFT,
    FlowVersionState.PUBLISHED: flow_pb2.FLOW_VERSION_STATE_PUBLISHED,
}


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    # Integer arithmetic on microseconds: Timestamp.FromDatetime was a tenth of a status change's CPU.
    us = to_us(value)
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=us % 1_000_000 * 1000)


def duration(value: timedelta) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(value)
    return d


def outcome_from_pb(value: int) -> SessionOutcome | None:
    """None for a number this server does not know (a newer client's enum value)."""
    return _OUTCOME_FROM_PB.get(value)


def execution_timeout(v: Violations, request: Any) -> timedelta:
    """Checked on the exact Duration, before conversion can overflow or round it."""
    if not request.HasField("execution_timeout"):
        return DEFAULT_EXECUTION_TIMEOUT
    d = request.execution_timeout
    total_ns = d.seconds * 1_000_000_000 + d.nanos
    low, high = (int(t / timedelta(microseconds=1)) * 1000 for t in (MIN_EXECUTION_TIMEOUT, MAX_EXECUTION_TIMEOUT))
    if not low <= total_ns <= high:
        v.add("execution_timeout", "must be between 1 second and 30 days")
    elif d.nanos % 1000:
        v.add("execution_timeout", "must be a whole number of microseconds")
    else:
        return d.ToTimedelta()
    return DEFAULT_EXECUTION_TIMEOUT


def graph_from_pb(start_step_id: str, steps: Any) -> FlowGraph:
    return FlowGraph(
        start_step_id,
        tuple(
            Step(s.step_id, s.step_type, dict(s.routes), _OUTCOME_FROM_PB.get(s.outcome, SessionOutcome.UNSPECIFIED))
            for s in steps
        ),
    )


def flow_pb(flow: Flow) -> flow_pb2.Flow:
    return flow_pb2.Flow(
        flow_id=flow.flow_id,
        name=flow.name,
        description=flow.description,
        create_time=timestamp(flow.create_time),
        update_time=timestamp(flow.update_time),
        published_versions=dict(flow.published_versions),
        latest_version=flow.latest_version,
    )


def flow_version_pb(fv: FlowVersion) -> flow_pb2.FlowVersion:
    pb = flow_pb2.FlowVersion(
        flow_id=fv.flow_id,
        version=fv.version,
        state=_STATE_TO_PB[fv.state],
        start_step_id=fv.graph.start_step_id,
        steps=[
            flow_pb2.Step(step_id=s.step_id, step_type=s.step_type, routes=dict(s.routes), outcome=_OUTCOME_TO_PB[s.outcome])
            for s in fv.graph.steps
        ],
        execution_timeout=duration(fv.execution_timeout),
        create_time=timestamp(fv.create_time),
        update_time=timestamp(fv.update_time),
        environments=list(fv.environments),
    )
    if fv.publish_time is not None:
        pb.publish_time.CopyFrom(timestamp(fv.publish_time))
    return pb


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(value)


class _Recent:
    """The protos of recently converted sessions. (session_id, version) names one immutable state, and a
    change is converted for its RPC answer and again for its watch event: keeping it converts it once."""

    def __init__(self, capacity: int = 4096):
        self._capacity = capacity
        self._items: OrderedDict[tuple[str, int], session_pb2.Session] = OrderedDict()

    def get(self, s: Session) -> session_pb2.Session:
        key = (s.session_id, s.version)
        found = self._items.get(key)
        if found is None:
            found = self._items[key] = _session_pb(s)
            if len(self._items) > self._capacity:
                self._items.popitem(last=False)
        return found


_recent = _Recent()


def session_pb(s: Session) -> session_pb2.Session:
    """Shared: callers embed it in a message (which copies it) and never modify it."""
    return _recent.get(s)


def _session_pb(s: Session) -> session_pb2.Session:
    pb = session_pb2.Session(
        session_id=s.session_id,
        flow_id=s.flow_id,
        flow_version=s.flow_version,
        environment=s.environment,
        status=STATUS_TO_PB[s.status],
        outcome=_OUTCOME_TO_PB[s.outcome],
        current_step_id=s.current_step_id,
        current_step_type=s.current_step_type,
        metadata=dict(s.metadata),
        redirect_url=s.redirect_url,
        state=s.state,
        create_time=timestamp(s.create_time),
        update_time=timestamp(s.update_time),
        expire_time=timestamp(s.expire_time),
        abort_reason=s.abort_reason,
        version=s.version,
    )
    if s.input:
        pb.input.update(dict(s.input))
    if s.last_step is not None:
        pb.last_step.CopyFrom(
            session_pb2.StepResult(
                step_id=s.last_step.step_id,
                step_type=s.last_step.step_type,
                verdict=s.last_step.verdict,
                report_time=timestamp(s.last_step.report_time),
            )
        )
    if s.end_time is not None:
        pb.end_time.CopyFrom(timestamp(s.end_time))
    if s.error is not None:
        pb.error.CopyFrom(session_pb2.SessionError(code=s.error.code, message=s.error.message, step_id=s.error.step_id))
    return pb


def cursor_token(epoch: str, cursor: int) -> str:
    """Opaque to clients; embeds the store epoch so a cursor from another database is recognisable."""
    return f"{epoch}-{cursor:016x}"


def event_pb(event: SessionEvent, epoch: str) -> session_pb2.SessionEvent:
    return session_pb2.SessionEvent(
        version=event.version,
        type=_EVENT_TO_PB[event.type],
        event_time=timestamp(event.event_time),
        session=session_pb(event.session),
        cursor=cursor_token(epoch, event.cursor),
    )
