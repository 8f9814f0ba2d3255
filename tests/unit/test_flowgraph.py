"""Flow graph validation and routing (domain/flowgraph.py).

Every refused graph raises InvalidArgument with reason INVALID_FLOW_GRAPH and a field violation
that names the offending step (``steps[i]...``) or field (``start_step_id``, ``steps``,
``execution_timeout``).
"""
from __future__ import annotations

from datetime import timedelta

import pytest
from flowsession_server.domain import flowgraph, limits
from flowsession_server.domain.errors import FieldViolation, InvalidArgument
from flowsession_server.domain.model import FlowGraph, SessionOutcome, Step

HOUR = timedelta(hours=1)
ACCEPTED = SessionOutcome.ACCEPTED
REJECTED = SessionOutcome.REJECTED


def kyc_steps() -> list[Step]:
    """document -> liveness -> accepted; "bad" -> rejected; liveness may retry itself (a cycle)."""
    return [
        Step("document", "document_check", {"ok": "liveness", "bad": "rejected"}),
        Step("liveness", "liveness_check", {"ok": "accepted", "bad": "rejected", "retry": "liveness"}),
        Step("accepted", "end", outcome=ACCEPTED),
        Step("rejected", "end", outcome=REJECTED),
    ]


def graph(steps: list[Step], start: str = "document") -> FlowGraph:
    return FlowGraph(start, tuple(steps))


def violations(g: FlowGraph, timeout: timedelta = HOUR) -> list[FieldViolation]:
    with pytest.raises(InvalidArgument) as info:
        flowgraph.validate(g, timeout)
    err = info.value
    assert err.reason == "INVALID_FLOW_GRAPH"
    assert err.violations, "an InvalidArgument must say which fields are wrong"
    for v in err.violations:
        assert v.field in err.message  # the message summarises every violation
    return err.violations


def fields(g: FlowGraph, timeout: timedelta = HOUR) -> list[str]:
    return [v.field for v in violations(g, timeout)]


def only(g: FlowGraph, timeout: timedelta = HOUR) -> FieldViolation:
    found = violations(g, timeout)
    assert len(found) == 1, found
    return found[0]


def chain(n_checks: int) -> list[Step]:
    """s0 -> s1 -> ... -> s{n-1} -> end: n_checks + 1 steps, all valid."""
    steps = [Step(f"s{i}", "check", {"ok": f"s{i + 1}" if i + 1 < n_checks else "end"}) for i in range(n_checks)]
    return [*steps, Step("end", "end", outcome=ACCEPTED)]


# Valid graphs


def test_kyc_graph_with_self_loop_is_valid() -> None:
    flowgraph.validate(graph(kyc_steps()), HOUR)


def test_longer_cycle_is_valid() -> None:
    steps = kyc_steps()
    steps[1] = Step("liveness", "liveness_check", {"ok": "accepted", "bad": "rejected", "back": "document"})
    flowgraph.validate(graph(steps), HOUR)


def test_smallest_graph_is_valid() -> None:
    flowgraph.validate(graph([Step("a", "t", {"ok": "z"}), Step("z", "end", outcome=REJECTED)], start="a"), HOUR)


@pytest.mark.parametrize("timeout", [timedelta(seconds=1), HOUR, timedelta(days=30)])
def test_execution_timeout_bounds_are_inclusive(timeout: timedelta) -> None:
    flowgraph.validate(graph(kyc_steps()), timeout)


def test_limits_at_their_maximum_are_valid() -> None:
    flowgraph.validate(graph(chain(limits.MAX_STEPS - 1), start="s0"), HOUR)  # exactly MAX_STEPS steps
    long_id = "x" * limits.MAX_STEP_ID
    steps = [Step("a", "t", {"ok": long_id}), Step(long_id, "end", outcome=ACCEPTED)]
    flowgraph.validate(graph(steps, start="a"), HOUR)
    many = {f"v{i}": "z" for i in range(limits.MAX_ROUTES)}
    flowgraph.validate(graph([Step("a", "t", many), Step("z", "end", outcome=ACCEPTED)], start="a"), HOUR)


# Refused graphs, one problem each


def test_duplicate_step_id() -> None:
    steps = [*kyc_steps(), Step("liveness", "other", {"ok": "accepted"})]
    v = only(graph(steps))
    assert v.field == "steps[4].step_id"
    assert "liveness" in v.description and "more than once" in v.description


def test_missing_start_step() -> None:
    v = only(graph(kyc_steps(), start="welcome"))
    assert v.field == "start_step_id"
    assert "welcome" in v.description


def test_empty_start_step_id() -> None:
    v = only(graph(kyc_steps(), start=""))
    assert v.field == "start_step_id"
    assert "required" in v.description


def test_start_step_is_an_end_step() -> None:
    found = violations(graph(kyc_steps(), start="accepted"))
    start = [v for v in found if v.field == "start_step_id"]
    assert len(start) == 1 and "end step" in start[0].description
    # Nothing else can be reached from an end step.
    assert {v.field for v in found} == {"start_step_id", "steps[0]", "steps[1]", "steps[3]"}


def test_route_to_unknown_step() -> None:
    steps = kyc_steps()
    steps[1] = Step("liveness", "liveness_check", {"ok": "accepted", "bad": "rejected", "odd": "ghost"})
    v = only(graph(steps))
    assert v.field.startswith("steps[1].routes")
    assert v.field == "steps[1].routes['odd']"
    assert "ghost" in v.description


def test_unreachable_step() -> None:
    steps = [*kyc_steps(), Step("orphan", "check", {"ok": "accepted"})]
    v = only(graph(steps))
    assert v.field == "steps[4]"
    assert "orphan" in v.description and "reachable" in v.description


def test_unreachable_end_step() -> None:
    steps = kyc_steps()
    steps.insert(2, Step("limbo", "end", outcome=REJECTED))
    v = only(graph(steps))
    assert v.field == "steps[2]"


def test_non_end_step_without_routes() -> None:
    steps = kyc_steps()
    steps[0] = Step("document", "document_check", {"ok": "liveness", "bad": "rejected", "review": "manual"})
    steps.append(Step("manual", "manual_review"))
    v = only(graph(steps))
    assert v.field == "steps[4].routes"
    assert "manual" in v.description


def test_loop_with_no_way_to_an_end_step() -> None:
    # document -> review <-> recheck: reachable from the start, but no session could ever complete.
    steps = [
        Step("document", "document_check", {"ok": "accepted", "unsure": "review"}),
        Step("review", "manual_review", {"again": "recheck"}),
        Step("recheck", "document_check", {"again": "review"}),
        Step("accepted", "end", outcome=ACCEPTED),
    ]
    found = violations(graph(steps))
    assert [v.field for v in found] == ["steps[1].routes", "steps[2].routes"]
    assert "'review'" in found[0].description and "end step" in found[0].description
    assert "'recheck'" in found[1].description


def test_step_that_only_retries_itself() -> None:
    steps = kyc_steps()
    steps[0] = Step("document", "document_check", {"ok": "liveness", "bad": "rejected", "known": "accepted"})
    steps[1] = Step("liveness", "liveness_check", {"retry": "liveness"})
    v = only(graph(steps))
    assert v.field == "steps[1].routes"
    assert "'liveness'" in v.description


def test_loops_with_a_way_out_are_valid() -> None:
    # liveness retries itself, and document may go back to itself via "rescan": both can still finish.
    steps = kyc_steps()
    steps[0] = Step("document", "document_check", {"ok": "liveness", "bad": "rejected", "rescan": "document"})
    flowgraph.validate(graph(steps), HOUR)


def test_dead_end_is_reported_once_at_its_step() -> None:
    # Steps leading only to a step that is already refused are not refused again for it.
    steps = [
        Step("document", "document_check", {"ok": "liveness"}),
        Step("liveness", "liveness_check", {"ok": "ghost"}),
        Step("accepted", "end", outcome=ACCEPTED),
    ]
    assert fields(graph(steps)) == ["steps[1].routes['ok']", "steps[2]"]


def test_end_step_with_routes() -> None:
    steps = kyc_steps()
    steps[2] = Step("accepted", "end", {"again": "document"}, outcome=ACCEPTED)
    v = only(graph(steps))
    assert v.field == "steps[2].routes"
    assert "end step" in v.description


def test_no_steps() -> None:
    v = only(graph([]))
    assert v.field == "steps"


def test_too_many_steps() -> None:
    steps = chain(limits.MAX_STEPS)  # MAX_STEPS + 1 steps
    assert len(steps) == limits.MAX_STEPS + 1
    v = only(graph(steps, start="s0"))
    assert v.field == "steps"
    assert str(limits.MAX_STEPS) in v.description


def test_too_many_routes() -> None:
    many = {f"v{i}": "z" for i in range(limits.MAX_ROUTES + 1)}
    v = only(graph([Step("a", "t", many), Step("z", "end", outcome=ACCEPTED)], start="a"))
    assert v.field == "steps[0].routes"


@pytest.mark.parametrize("bad_id", ["has space", "slash/", "ünïcode", "semi;colon", "tab\t"])
def test_step_id_with_bad_characters(bad_id: str) -> None:
    steps = kyc_steps()
    steps[0] = Step("document", "document_check", {"ok": "liveness", "bad": "rejected", "x": bad_id})
    steps.append(Step(bad_id, "check", {"ok": "accepted"}))
    v = only(graph(steps))
    assert v.field == "steps[4].step_id"
    assert "letters, digits" in v.description


def test_step_id_too_long() -> None:
    long_id = "x" * (limits.MAX_STEP_ID + 1)
    steps = [Step("a", "t", {"ok": long_id}), Step(long_id, "end", outcome=ACCEPTED)]
    v = only(graph(steps, start="a"))
    assert v.field == "steps[1].step_id"
    assert str(limits.MAX_STEP_ID) in v.description


def test_start_step_id_with_bad_characters() -> None:
    found = violations(graph(kyc_steps(), start="doc ument"))
    assert {v.field for v in found} == {"start_step_id"}


def test_empty_step_id_and_step_type() -> None:
    steps = [*kyc_steps(), Step("", "")]
    found = fields(graph(steps))
    assert "steps[4].step_id" in found
    assert "steps[4].step_type" in found


def test_bad_verdict_characters() -> None:
    steps = kyc_steps()
    steps[0] = Step("document", "document_check", {"ok": "liveness", "not ok": "rejected"})
    v = only(graph(steps))
    assert v.field == "steps[0].routes['not ok']"


@pytest.mark.parametrize(
    "timeout",
    [
        timedelta(0),
        timedelta(milliseconds=999),
        timedelta(seconds=1) - timedelta(microseconds=1),
        timedelta(seconds=-5),
        timedelta(days=30, microseconds=1),
        timedelta(days=31),
    ],
    ids=["zero", "999ms", "1s-1us", "negative", "30d+1us", "31d"],
)
def test_execution_timeout_out_of_range(timeout: timedelta) -> None:
    v = only(graph(kyc_steps()), timeout)
    assert v.field == "execution_timeout"


def test_several_problems_reported_at_once() -> None:
    steps = [
        Step("document", "document_check", {"ok": "liveness", "bad": "rejected"}),
        Step("liveness", "liveness_check", {"ok": "accepted", "odd": "ghost"}),  # unknown target
        Step("accepted", "end", {"again": "document"}, outcome=ACCEPTED),  # end step with routes
        Step("rejected", "end", outcome=REJECTED),
        Step("document", "dup", {"ok": "accepted"}),  # duplicate id
        Step("orphan", "check", {"ok": "accepted"}),  # unreachable
        Step("stuck", "check"),  # no routes, and unreachable
    ]
    found = fields(graph(steps), timedelta(0))
    assert set(found) == {
        "execution_timeout",
        "steps[1].routes['odd']",
        "steps[2].routes",
        "steps[4].step_id",
        "steps[5]",
        "steps[6].routes",
        "steps[6]",
    }
    assert len(found) == 7


# route


def test_route_picks_the_target_step() -> None:
    g = graph(kyc_steps())
    assert flowgraph.route(g, "document", "ok") == kyc_steps()[1]
    assert flowgraph.route(g, "document", "bad").step_id == "rejected"
    assert flowgraph.route(g, "liveness", "ok").outcome is ACCEPTED
    assert flowgraph.route(g, "liveness", "retry").step_id == "liveness"


@pytest.mark.parametrize(("step_id", "verdict"), [("document", "retry"), ("document", ""), ("accepted", "ok"), ("ghost", "ok")])
def test_route_refuses_unknown_verdict(step_id: str, verdict: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        flowgraph.route(graph(kyc_steps()), step_id, verdict)
    assert info.value.reason == "UNKNOWN_VERDICT"
    assert [v.field for v in info.value.violations] == ["verdict"]


# Regression: TOKEN_PATTERN was once anchored with "^...$", and "$" also matches just before a
# trailing newline, so "liveness\n" passed as a step id (and as a step type, verdict or start_step_id).


def _with_newline(where: str) -> tuple[FlowGraph, str]:
    steps = kyc_steps()
    if where == "step_id":
        steps[0] = Step("document", "document_check", {"ok": "liveness", "bad": "rejected", "x": "extra\n"})
        steps.append(Step("extra\n", "check", {"ok": "accepted"}))
        return graph(steps), "steps[4].step_id"
    if where == "step_type":
        steps[1] = Step("liveness", "liveness_check\n", {"ok": "accepted", "bad": "rejected"})
        return graph(steps), "steps[1].step_type"
    if where == "verdict":
        steps[0] = Step("document", "document_check", {"ok\n": "liveness", "bad": "rejected"})
        return graph(steps), "steps[0].routes['ok\\n']"
    assert where == "start_step_id"
    return graph([Step("document\n", "document_check", {"ok": "accepted"}), *kyc_steps()[2:]], start="document\n"), "start_step_id"


@pytest.mark.parametrize("where", ["step_id", "step_type", "verdict", "start_step_id"])
def test_trailing_newline_in_identifier_is_refused(where: str) -> None:
    g, field = _with_newline(where)
    assert field in fields(g)
