"""The session state machine (domain/lifecycle.py): every status x every verb, plus each verb's rules.

Sessions are built with lifecycle.start() on a FlowVersion made here; the other statuses come from
dataclasses.replace. Times are fixed, timezone-aware UTC datetimes: nothing reads a clock.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flowsession_server.domain import lifecycle
from flowsession_server.domain.errors import (
    FailedPrecondition,
    InvalidArgument,
    VersionMismatch,
)
from flowsession_server.domain.model import (
    EventType,
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

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TIMEOUT = timedelta(hours=1)
DEADLINE = T0 + TIMEOUT
NOW = T0 + timedelta(minutes=10)  # well before the deadline
LATE = DEADLINE + timedelta(minutes=5)  # past the deadline
US = timedelta(microseconds=1)

# document -> liveness -> accepted; "bad" on either -> rejected; liveness may retry itself.
GRAPH = FlowGraph(
    "document",
    (
        Step("document", "document_check", {"ok": "liveness", "bad": "rejected"}),
        Step("liveness", "liveness_check", {"ok": "accepted", "bad": "rejected", "retry": "liveness"}),
        Step("accepted", "end_accepted", outcome=SessionOutcome.ACCEPTED),
        Step("rejected", "end_rejected", outcome=SessionOutcome.REJECTED),
    ),
)
FLOW_VERSION = FlowVersion(
    flow_id="flw_1",
    version=3,
    state=FlowVersionState.PUBLISHED,
    graph=GRAPH,
    execution_timeout=TIMEOUT,
    create_time=T0 - timedelta(days=1),
    update_time=T0 - timedelta(days=1),
    publish_time=T0 - timedelta(days=1),
    environments=("live",),
)

TERMINALS = [s for s in SessionStatus if s is not SessionStatus.RUNNING]


def started(**overrides: Any) -> SessionEvent:
    args: dict[str, Any] = {
        "session_id": "ses_1",
        "flow_version": FLOW_VERSION,
        "environment": "live",
        "input": {"country": "FR", "tags": ["a", "b"]},
        "metadata": {"customer": "c-42"},
        "redirect_url": "https://example.com/back",
        "state": "opaque-state",
        "now": T0,
    }
    args.update(overrides)
    return lifecycle.start(**args)


def running() -> Session:
    return started().session


def in_status(status: SessionStatus) -> Session:
    """A session as it stands in ``status``: terminal ones have ended, after a few changes."""
    session = running()
    if status is SessionStatus.RUNNING:
        return session
    return dataclasses.replace(
        session,
        status=status,
        version=5,
        update_time=T0 + timedelta(minutes=5),
        end_time=T0 + timedelta(minutes=5),
        outcome=SessionOutcome.ACCEPTED if status is SessionStatus.COMPLETED else SessionOutcome.UNSPECIFIED,
    )


# The four verbs, each called with arguments that are valid for a RUNNING session at "document", so
# that from a terminal status the only thing wrong is the status.
VERBS: dict[str, Callable[[Session], SessionEvent]] = {
    "report_step": lambda s: lifecycle.report_step(s, FLOW_VERSION, step_id="document", verdict="bad", now=NOW),
    "abort": lambda s: lifecycle.abort(s, reason="user closed the app", now=NOW),
    "fail": lambda s: lifecycle.fail(s, step_id="document", code="VENDOR_DOWN", message="vendor timed out", now=NOW),
    "expire": lambda s: lifecycle.expire(s, now=LATE),
}


def expected_from_running(verb: str, before: Session) -> tuple[EventType, datetime, Session]:
    """(event type, event time, the whole session after) for ``verb`` applied to ``before`` (RUNNING)."""
    if verb == "report_step":
        return EventType.COMPLETED, NOW, dataclasses.replace(
            before,
            status=SessionStatus.COMPLETED,
            version=2,
            update_time=NOW,
            end_time=NOW,
            outcome=SessionOutcome.REJECTED,
            current_step_id="rejected",
            current_step_type="end_rejected",
            last_step=StepResult("document", "document_check", "bad", NOW),
        )
    if verb == "abort":
        return EventType.ABORTED, NOW, dataclasses.replace(
            before,
            status=SessionStatus.ABORTED,
            version=2,
            update_time=NOW,
            end_time=NOW,
            abort_reason="user closed the app",
        )
    if verb == "fail":
        return EventType.ERROR, NOW, dataclasses.replace(
            before,
            status=SessionStatus.ERROR,
            version=2,
            update_time=NOW,
            end_time=NOW,
            error=SessionError("VENDOR_DOWN", "vendor timed out", "document"),
        )
    assert verb == "expire"
    # end_time is the deadline itself, not the moment the server noticed.
    return EventType.EXPIRED, LATE, dataclasses.replace(
        before, status=SessionStatus.EXPIRED, version=2, update_time=LATE, end_time=DEADLINE
    )


EXPECTED_STATUS = {
    "report_step": SessionStatus.COMPLETED,
    "abort": SessionStatus.ABORTED,
    "fail": SessionStatus.ERROR,
    "expire": SessionStatus.EXPIRED,
}


# The matrix


@pytest.mark.parametrize(
    ("status", "verb"),
    list(itertools.product(list(SessionStatus), list(VERBS))),
    ids=lambda x: x.value if isinstance(x, SessionStatus) else x,
)
def test_transition_matrix(status: SessionStatus, verb: str) -> None:
    before = in_status(status)
    snapshot = copy.deepcopy(before)

    if status is SessionStatus.RUNNING:
        event = VERBS[verb](before)
        event_type, event_time, after = expected_from_running(verb, before)
        assert event.session.status is EXPECTED_STATUS[verb]
        assert event.type is event_type
        assert event.session_id == before.session_id
        assert event.version == event.session.version == before.version + 1
        assert event.event_time == event_time
        assert event.cursor == 0  # only the store assigns log positions
        assert event.terminal
        assert event.session.status in lifecycle.TRANSITIONS[SessionStatus.RUNNING]
        # The whole session: status, version, end_time, outcome, error, abort_reason, and nothing else moved.
        assert event.session == after
    else:
        with pytest.raises(FailedPrecondition) as info:
            VERBS[verb](before)
        assert info.value.reason == "SESSION_TERMINAL"
        assert info.value.metadata == {"status": status.value, "version": "5"}
        assert status.value in info.value.message

    assert before == snapshot  # the input is never changed


def test_matrix_covers_every_status_and_verb() -> None:
    assert set(SessionStatus) == {
        SessionStatus.RUNNING,
        SessionStatus.COMPLETED,
        SessionStatus.ABORTED,
        SessionStatus.EXPIRED,
        SessionStatus.ERROR,
    }
    assert set(EXPECTED_STATUS.values()) == set(TERMINALS)


@pytest.mark.parametrize("status", TERMINALS, ids=lambda s: s.value)
def test_terminal_refusal_wins_over_other_problems(status: SessionStatus) -> None:
    """A terminal session says SESSION_TERMINAL even when the step or verdict would also be wrong."""
    before = in_status(status)
    with pytest.raises(FailedPrecondition) as info:
        lifecycle.report_step(before, FLOW_VERSION, step_id="liveness", verdict="nonsense", now=NOW)
    assert info.value.reason == "SESSION_TERMINAL"
    with pytest.raises(FailedPrecondition) as info:
        lifecycle.fail(before, step_id="elsewhere", code="X", message="y", now=NOW)
    assert info.value.reason == "SESSION_TERMINAL"
    with pytest.raises(FailedPrecondition) as info:
        lifecycle.expire(before, now=NOW)  # not due either
    assert info.value.reason == "SESSION_TERMINAL"


# The transition table


def test_transition_table() -> None:
    assert dict(lifecycle.TRANSITIONS) == {
        SessionStatus.RUNNING: frozenset(
            {SessionStatus.COMPLETED, SessionStatus.ABORTED, SessionStatus.EXPIRED, SessionStatus.ERROR}
        ),
        SessionStatus.COMPLETED: frozenset(),
        SessionStatus.ABORTED: frozenset(),
        SessionStatus.EXPIRED: frozenset(),
        SessionStatus.ERROR: frozenset(),
    }


@pytest.mark.parametrize("status", list(SessionStatus), ids=lambda s: s.value)
def test_terminal_property_matches_table(status: SessionStatus) -> None:
    assert status.terminal == (not lifecycle.TRANSITIONS[status])
    assert status.terminal == (status is not SessionStatus.RUNNING)


# start


def test_start_creates_running_session_at_start_step() -> None:
    event = started()
    s = event.session
    assert event.type is EventType.CREATED
    assert event.version == s.version == 1
    assert event.event_time == T0
    assert event.session_id == s.session_id == "ses_1"
    assert not event.terminal
    assert s.status is SessionStatus.RUNNING
    assert (s.flow_id, s.flow_version, s.environment) == ("flw_1", 3, "live")
    assert (s.current_step_id, s.current_step_type) == ("document", "document_check")
    assert s.create_time == s.update_time == T0
    assert s.expire_time == DEADLINE
    assert s.end_time is None
    assert s.outcome is SessionOutcome.UNSPECIFIED
    assert s.last_step is None and s.error is None and s.abort_reason == ""
    assert s.metadata == {"customer": "c-42"}
    assert s.input == {"country": "FR", "tags": ["a", "b"]}
    assert (s.redirect_url, s.state) == ("https://example.com/back", "opaque-state")


def test_start_copies_metadata() -> None:
    metadata = {"customer": "c-42"}
    session = started(metadata=metadata).session
    metadata["customer"] = "changed"
    assert session.metadata == {"customer": "c-42"}


# report_step


def test_report_step_to_non_end_step_moves_current_step() -> None:
    before = running()
    event = lifecycle.report_step(before, FLOW_VERSION, step_id="document", verdict="ok", now=NOW)
    after = event.session
    assert event.type is EventType.STEP_COMPLETED
    assert not event.terminal
    assert after.status is SessionStatus.RUNNING
    assert after.version == event.version == 2
    assert (after.current_step_id, after.current_step_type) == ("liveness", "liveness_check")
    assert after.last_step == StepResult("document", "document_check", "ok", NOW)
    assert after.update_time == NOW
    assert after.end_time is None
    assert after.outcome is SessionOutcome.UNSPECIFIED
    assert after == dataclasses.replace(
        before,
        version=2,
        update_time=NOW,
        current_step_id="liveness",
        current_step_type="liveness_check",
        last_step=StepResult("document", "document_check", "ok", NOW),
    )


def test_report_step_self_loop_stays_on_step_and_counts_a_version() -> None:
    at_liveness = lifecycle.report_step(running(), FLOW_VERSION, step_id="document", verdict="ok", now=NOW).session
    later = NOW + timedelta(seconds=30)
    event = lifecycle.report_step(at_liveness, FLOW_VERSION, step_id="liveness", verdict="retry", now=later)
    assert event.type is EventType.STEP_COMPLETED
    assert event.session.status is SessionStatus.RUNNING
    assert event.session.current_step_id == "liveness"
    assert event.session.version == 3
    assert event.session.last_step == StepResult("liveness", "liveness_check", "retry", later)


def test_report_step_to_end_step_completes_with_its_outcome() -> None:
    at_liveness = lifecycle.report_step(running(), FLOW_VERSION, step_id="document", verdict="ok", now=NOW).session
    done_at = NOW + timedelta(minutes=1)
    event = lifecycle.report_step(at_liveness, FLOW_VERSION, step_id="liveness", verdict="ok", now=done_at)
    after = event.session
    assert event.type is EventType.COMPLETED
    assert event.terminal
    assert after.status is SessionStatus.COMPLETED
    assert after.outcome is SessionOutcome.ACCEPTED
    assert (after.current_step_id, after.current_step_type) == ("accepted", "end_accepted")
    assert after.last_step == StepResult("liveness", "liveness_check", "ok", done_at)
    assert after.end_time == after.update_time == done_at
    assert after.version == 3
    assert after.error is None and after.abort_reason == ""


@pytest.mark.parametrize("step_id", ["liveness", "accepted", "no-such-step", ""])
def test_report_step_not_current(step_id: str) -> None:
    before = running()
    with pytest.raises(FailedPrecondition) as info:
        lifecycle.report_step(before, FLOW_VERSION, step_id=step_id, verdict="ok", now=NOW)
    assert info.value.reason == "STEP_NOT_CURRENT"
    assert info.value.metadata == {"current_step_id": "document"}


@pytest.mark.parametrize("verdict", ["maybe", "", "OK", "retry"])  # "retry" is a route of another step
def test_report_step_unknown_verdict(verdict: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        lifecycle.report_step(running(), FLOW_VERSION, step_id="document", verdict=verdict, now=NOW)
    err = info.value
    assert err.reason == "UNKNOWN_VERDICT"
    assert [v.field for v in err.violations] == ["verdict"]
    assert "bad, ok" in err.violations[0].description  # the allowed verdicts are named


# expected_version (etag)

ETAG_VERBS: dict[str, Callable[[Session, int], SessionEvent]] = {
    "report_step": lambda s, ev: lifecycle.report_step(
        s, FLOW_VERSION, step_id="document", verdict="ok", now=NOW, expected_version=ev
    ),
    "abort": lambda s, ev: lifecycle.abort(s, reason="r", now=NOW, expected_version=ev),
    "fail": lambda s, ev: lifecycle.fail(s, step_id="", code="C", message="m", now=NOW, expected_version=ev),
}


@pytest.mark.parametrize("verb", list(ETAG_VERBS))
@pytest.mark.parametrize("expected_version", [2, 7])
def test_expected_version_mismatch(verb: str, expected_version: int) -> None:
    before = running()  # version 1
    with pytest.raises(VersionMismatch) as info:
        ETAG_VERBS[verb](before, expected_version)
    assert info.value.reason == "VERSION_MISMATCH"
    assert info.value.metadata == {"version": "1"}


@pytest.mark.parametrize("verb", list(ETAG_VERBS))
@pytest.mark.parametrize("expected_version", [0, 1])  # 0: no etag given
def test_expected_version_match_or_absent(verb: str, expected_version: int) -> None:
    event = ETAG_VERBS[verb](running(), expected_version)
    assert event.version == 2


@pytest.mark.parametrize("verb", list(ETAG_VERBS))
def test_a_terminal_session_answers_session_terminal_before_any_version_mismatch(verb: str) -> None:
    ended = in_status(SessionStatus.ABORTED)
    for expected_version in (1, ended.version):  # stale etag, current etag: no retry can succeed
        with pytest.raises(FailedPrecondition) as info:
            ETAG_VERBS[verb](ended, expected_version)
        assert info.value.reason == "SESSION_TERMINAL"
        assert info.value.metadata == {"status": "ABORTED", "version": str(ended.version)}


# expire


def test_expire_before_deadline_is_refused() -> None:
    before = running()
    for now in (T0, NOW, DEADLINE - US):
        with pytest.raises(FailedPrecondition) as info:
            lifecycle.expire(before, now=now)
        assert info.value.reason == "SESSION_NOT_DUE"


def test_expiring_an_ended_session_is_session_terminal_with_its_status_and_version() -> None:
    ended = in_status(SessionStatus.COMPLETED)
    with pytest.raises(FailedPrecondition) as info:
        lifecycle.expire(ended, now=DEADLINE + US)
    assert info.value.reason == "SESSION_TERMINAL"
    assert info.value.metadata == {"status": "COMPLETED", "version": str(ended.version)}


@pytest.mark.parametrize("now", [DEADLINE, DEADLINE + US, DEADLINE + timedelta(days=3)])
def test_expire_sets_end_time_to_deadline(now: datetime) -> None:
    event = lifecycle.expire(running(), now=now)
    assert event.type is EventType.EXPIRED
    assert event.session.status is SessionStatus.EXPIRED
    assert event.session.end_time == DEADLINE
    assert event.session.update_time == event.event_time == now
    assert event.session.version == 2


def test_is_overdue() -> None:
    session = running()
    assert not lifecycle.is_overdue(session, T0)
    assert not lifecycle.is_overdue(session, DEADLINE - US)
    assert lifecycle.is_overdue(session, DEADLINE)
    assert lifecycle.is_overdue(session, LATE)
    for status in TERMINALS:
        assert not lifecycle.is_overdue(in_status(status), LATE)


# fail


def test_fail_with_step_that_is_not_current() -> None:
    with pytest.raises(FailedPrecondition) as info:
        lifecycle.fail(running(), step_id="liveness", code="C", message="m", now=NOW)
    assert info.value.reason == "STEP_NOT_CURRENT"
    assert info.value.metadata == {"current_step_id": "document"}


def test_fail_without_step_id() -> None:
    event = lifecycle.fail(running(), step_id="", code="INTERNAL_VENDOR", message="boom", now=NOW)
    assert event.type is EventType.ERROR
    assert event.session.status is SessionStatus.ERROR
    assert event.session.error == SessionError("INTERNAL_VENDOR", "boom", "")
    assert event.session.end_time == NOW
    assert event.session.current_step_id == "document"


# Purity


def test_functions_never_mutate_their_input() -> None:
    session = running()
    snapshot = copy.deepcopy(session)
    fv_snapshot = copy.deepcopy(FLOW_VERSION)
    lifecycle.report_step(session, FLOW_VERSION, step_id="document", verdict="ok", now=NOW)
    lifecycle.report_step(session, FLOW_VERSION, step_id="document", verdict="bad", now=NOW)
    lifecycle.abort(session, reason="r", now=NOW)
    lifecycle.fail(session, step_id="document", code="C", message="m", now=NOW)
    lifecycle.expire(session, now=LATE)
    lifecycle.is_overdue(session, LATE)
    for refused in (
        lambda: lifecycle.report_step(session, FLOW_VERSION, step_id="liveness", verdict="ok", now=NOW),
        lambda: lifecycle.report_step(session, FLOW_VERSION, step_id="document", verdict="??", now=NOW),
        lambda: lifecycle.abort(session, reason="r", now=NOW, expected_version=9),
        lambda: lifecycle.expire(session, now=NOW),
    ):
        with pytest.raises((FailedPrecondition, InvalidArgument, VersionMismatch)):
            refused()
    assert session == snapshot
    assert session.status is SessionStatus.RUNNING and session.version == 1
    assert FLOW_VERSION == fv_snapshot


def test_model_is_frozen() -> None:
    session = running()
    event = started()
    with pytest.raises(dataclasses.FrozenInstanceError):
        session.status = SessionStatus.ABORTED  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.version = 9  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        FLOW_VERSION.graph.steps[0].routes = {}  # type: ignore[misc]
