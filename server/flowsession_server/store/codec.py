"""Row <-> domain conversion. Times are stored as integer microseconds since the Unix epoch."""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from typing import Any

from ..domain.model import (
    EventType,
    Flow,
    FlowGraph,
    FlowVersion,
    FlowVersionState,
    Session,
    SessionError,
    SessionEvent,
    SessionOutcome,
    SessionStatus,
    Step,
    StepResult,
)

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)


def to_us(value: datetime) -> int:
    return (value - EPOCH) // _US


def from_us(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


def _opt_us(value: datetime | None) -> int | None:
    return None if value is None else to_us(value)


def _opt_dt(value: int | None) -> datetime | None:
    return None if value is None else from_us(value)


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def graph_to_json(graph: FlowGraph) -> str:
    return dumps(
        {
            "start": graph.start_step_id,
            "steps": [
                {"id": s.step_id, "type": s.step_type, "routes": dict(s.routes), "outcome": s.outcome.value}
                for s in graph.steps
            ],
        }
    )


def graph_from_json(text: str) -> FlowGraph:
    data = json.loads(text)
    return FlowGraph(
        data["start"],
        tuple(Step(s["id"], s["type"], s["routes"], SessionOutcome(s["outcome"])) for s in data["steps"]),
    )


def flow_from_row(row: Any, published: dict[str, int]) -> Flow:
    return Flow(
        flow_id=row["flow_id"],
        name=row["name"],
        description=row["description"],
        create_time=from_us(row["create_us"]),
        update_time=from_us(row["update_us"]),
        latest_version=row["latest_version"],
        published_versions=published,
    )


def flow_version_from_row(row: Any, environments: tuple[str, ...]) -> FlowVersion:
    return FlowVersion(
        flow_id=row["flow_id"],
        version=row["version"],
        state=FlowVersionState(row["state"]),
        graph=graph_from_json(row["graph"]),
        execution_timeout=timedelta(microseconds=row["timeout_us"]),
        create_time=from_us(row["create_us"]),
        update_time=from_us(row["update_us"]),
        publish_time=_opt_dt(row["publish_us"]),
        environments=environments,
    )


def session_body(session: Session) -> str:
    """Everything but ``input``, which is immutable and stored once per session, not per event."""
    last = session.last_step
    err = session.error
    return dumps(
        {
            "flow_id": session.flow_id,
            "flow_version": session.flow_version,
            "environment": session.environment,
            "status": session.status.value,
            "outcome": session.outcome.value,
            "step": session.current_step_id,
            "step_type": session.current_step_type,
            "last": None
            if last is None
            else {"id": last.step_id, "type": last.step_type, "verdict": last.verdict, "at": to_us(last.report_time)},
            "metadata": dict(session.metadata),
            "redirect_url": session.redirect_url,
            "state": session.state,
            "create": to_us(session.create_time),
            "update": to_us(session.update_time),
            "expire": to_us(session.expire_time),
            "end": _opt_us(session.end_time),
            "error": None if err is None else {"code": err.code, "message": err.message, "step": err.step_id},
            "abort_reason": session.abort_reason,
            "version": session.version,
        }
    )


def session_from_body(session_id: str, body: str, input_json: str) -> Session:
    d = json.loads(body)
    last = d["last"]
    err = d["error"]
    return Session(
        session_id=session_id,
        flow_id=d["flow_id"],
        flow_version=d["flow_version"],
        environment=d["environment"],
        status=SessionStatus(d["status"]),
        outcome=SessionOutcome(d["outcome"]),
        current_step_id=d["step"],
        current_step_type=d["step_type"],
        last_step=None if last is None else StepResult(last["id"], last["type"], last["verdict"], from_us(last["at"])),
        metadata=d["metadata"],
        redirect_url=d["redirect_url"],
        state=d["state"],
        input=json.loads(input_json),
        create_time=from_us(d["create"]),
        update_time=from_us(d["update"]),
        expire_time=from_us(d["expire"]),
        end_time=_opt_dt(d["end"]),
        error=None if err is None else SessionError(err["code"], err["message"], err["step"]),
        abort_reason=d["abort_reason"],
        version=d["version"],
    )


def event_tag(session_id: str, version: int, event_us: int) -> str:
    """Names one event whatever its cursor: a session id is random, and its version and commit time
    (to the microsecond) tell its changes apart, so a restored database's different event at the same
    cursor gets another tag. 32 bits: a false match takes a 1 in 4 billion coincidence."""
    return hashlib.blake2b(f"{session_id}/{version}/{event_us}".encode(), digest_size=4).hexdigest()


def event_from_row(row: Any) -> SessionEvent:
    session = session_from_body(row["session_id"], row["body"], row["input"])
    return SessionEvent(
        session_id=row["session_id"],
        version=row["version"],
        type=EventType(row["type"]),
        event_time=from_us(row["event_us"]),
        session=session,
        cursor=row["cursor"],
        tag=event_tag(row["session_id"], row["version"], row["event_us"]),
    )
