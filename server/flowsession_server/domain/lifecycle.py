"""THE session state machine. Every writer (RPCs, the expiry scheduler) goes through these functions.

RUNNING -> COMPLETED | ABORTED | EXPIRED | ERROR; a terminal status goes nowhere. Each function takes
the session as stored plus ``now`` and returns the next session state with the event that records it;
it never mutates, and raises a DomainError when the change is not allowed.
"""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any, Mapping

from . import flowgraph
from .errors import FailedPrecondition, VersionMismatch
from .model import (
    EventType,
    FlowVersion,
    Session,
    SessionError,
    SessionEvent,
    SessionStatus,
    StepResult,
)

TRANSITIONS: Mapping[SessionStatus, frozenset[SessionStatus]] = {
    SessionStatus.RUNNING: frozenset(
        {SessionStatus.COMPLETED, SessionStatus.ABORTED, SessionStatus.EXPIRED, SessionStatus.ERROR}
    ),
    SessionStatus.COMPLETED: frozenset(),
    SessionStatus.ABORTED: frozenset(),
    SessionStatus.EXPIRED: frozenset(),
    SessionStatus.ERROR: frozenset(),
}


def start(
    *,
    session_id: str,
    flow_version: FlowVersion,
    environment: str,
    input: Mapping[str, Any],
    metadata: Mapping[str, str],
    redirect_url: str,
    state: str,
    now: datetime,
) -> SessionEvent:
    first = flow_version.graph.step(flow_version.graph.start_step_id)
    assert first is not None, "published graphs are validated"
    session = Session(
        session_id=session_id,
        flow_id=flow_version.flow_id,
        flow_version=flow_version.version,
        environment=environment,
        status=SessionStatus.RUNNING,
        current_step_id=first.step_id,
        current_step_type=first.step_type,
        create_time=now,
        update_time=now,
        expire_time=now + flow_version.execution_timeout,
        version=1,
        metadata=dict(metadata),
        redirect_url=redirect_url,
        state=state,
        input=dict(input),
    )
    return SessionEvent(session_id, 1, EventType.CREATED, now, session)


def is_overdue(session: Session, now: datetime) -> bool:
    return session.status is SessionStatus.RUNNING and now >= session.expire_time


def report_step(
    session: Session, flow_version: FlowVersion, *, step_id: str, verdict: str, now: datetime, expected_version: int = 0
) -> SessionEvent:
    _check_changeable(session, expected_version)
    _check_current_step(session, step_id)
    target = flowgraph.route(flow_version.graph, step_id, verdict)
    last = StepResult(step_id, session.current_step_type, verdict, now)
    if target.is_end:
        return _transition(
            session,
            SessionStatus.COMPLETED,
            EventType.COMPLETED,
            now,
            current_step_id=target.step_id,
            current_step_type=target.step_type,
            outcome=target.outcome,
            last_step=last,
        )
    return _change(
        session,
        EventType.STEP_COMPLETED,
        now,
        current_step_id=target.step_id,
        current_step_type=target.step_type,
        last_step=last,
    )


def abort(session: Session, *, reason: str, now: datetime, expected_version: int = 0) -> SessionEvent:
    _check_changeable(session, expected_version)
    return _transition(session, SessionStatus.ABORTED, EventType.ABORTED, now, abort_reason=reason)


def fail(
    session: Session, *, step_id: str, code: str, message: str, now: datetime, expected_version: int = 0
) -> SessionEvent:
    _check_changeable(session, expected_version)
    if step_id:
        _check_current_step(session, step_id)
    return _transition(
        session, SessionStatus.ERROR, EventType.ERROR, now, error=SessionError(code, message, step_id)
    )


def expire(session: Session, *, now: datetime) -> SessionEvent:
    """Server-side only: the execution timeout passed while RUNNING. end_time is the deadline itself."""
    _check_changeable(session, 0)
    if now < session.expire_time:
        raise FailedPrecondition(
            f"session {session.session_id} is not due to expire until {session.expire_time.isoformat()}",
            reason="SESSION_NOT_DUE",
        )
    return _transition(session, SessionStatus.EXPIRED, EventType.EXPIRED, now, end_time=session.expire_time)


def _check_changeable(session: Session, expected_version: int) -> None:
    if session.status.terminal:
        raise FailedPrecondition(
            f"session {session.session_id} is {session.status.value} and cannot change",
            reason="SESSION_TERMINAL",
            metadata={"status": session.status.value, "version": str(session.version)},
        )
    if expected_version and expected_version != session.version:
        raise VersionMismatch(
            f"session {session.session_id} is at version {session.version}, not {expected_version}",
            metadata={"version": str(session.version)},
        )


def _check_current_step(session: Session, step_id: str) -> None:
    if step_id != session.current_step_id:
        raise FailedPrecondition(
            f"step {step_id!r} is not the current step of session {session.session_id} ({session.current_step_id!r})",
            reason="STEP_NOT_CURRENT",
            metadata={"current_step_id": session.current_step_id},
        )


def _transition(session: Session, to: SessionStatus, event: EventType, now: datetime, **changes: Any) -> SessionEvent:
    if to not in TRANSITIONS[session.status]:
        raise FailedPrecondition(
            f"session {session.session_id} cannot go from {session.status.value} to {to.value}",
            reason="SESSION_TERMINAL",
            metadata={"status": session.status.value, "version": str(session.version)},
        )
    changes.setdefault("end_time", now)
    return _change(session, event, now, status=to, **changes)


def _change(session: Session, event: EventType, now: datetime, **changes: Any) -> SessionEvent:
    version = session.version + 1
    after = replace(session, update_time=now, version=version, **changes)
    return SessionEvent(session.session_id, version, event, now, after)
