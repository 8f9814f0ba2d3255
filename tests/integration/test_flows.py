"""FlowService over a real server: every RPC, its limits and every documented error code.

Every failure is also checked for google.rpc.ErrorInfo with domain "flowsession" (see ``fails``).
"""
from __future__ import annotations

import base64
import json
from datetime import timedelta
from typing import Any

import grpc
import pytest
from flowsession.client import FlowsessionError, connect
from flowsession.v1 import flow_pb2, session_pb2
from flowsession.v1 import flow_service_pb2 as fpb
from flowsession.v1 import session_service_pb2 as spb
from flowsession_server.clock import FakeClock, SystemClock
from google.protobuf import duration_pb2

from ..support import (
    expect_error,
    ACCEPTED,
    REJECTED,
    TIMEOUT,
    ServerThread,
    end,
    kyc_steps,
    new_session,
    published_flow,
    settings_for,
    step,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
DRAFT = flow_pb2.FLOW_VERSION_STATE_DRAFT
PUBLISHED = flow_pb2.FLOW_VERSION_STATE_PUBLISHED


# helpers


fails = expect_error


def description_of(err: FlowsessionError, field: str) -> str:
    return " ".join(d for f, d in err.field_violations if f == field)


def create_flow(client, name: str = "kyc", description: str = "") -> flow_pb2.Flow:
    return client.flows.CreateFlow(fpb.CreateFlowRequest(name=name, description=description), timeout=TIMEOUT).flow


def get_flow(client, flow_id: str) -> flow_pb2.Flow:
    return client.flows.GetFlow(fpb.GetFlowRequest(flow_id=flow_id), timeout=TIMEOUT).flow


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(timedelta(seconds=seconds))
    return d


def version_request(flow_id: str, steps=None, start: str = "document", timeout: duration_pb2.Duration | None = None):
    request = fpb.CreateFlowVersionRequest(flow_id=flow_id, start_step_id=start, steps=kyc_steps() if steps is None else steps)
    if timeout is not None:
        request.execution_timeout.CopyFrom(timeout)
    return request


def create_version(client, flow_id: str, steps=None, start: str = "document", timeout=None) -> flow_pb2.FlowVersion:
    return client.flows.CreateFlowVersion(version_request(flow_id, steps, start, timeout), timeout=TIMEOUT).flow_version


def get_version(client, flow_id: str, version: int) -> flow_pb2.FlowVersion:
    return client.flows.GetFlowVersion(fpb.GetFlowVersionRequest(flow_id=flow_id, version=version), timeout=TIMEOUT).flow_version


def publish(client, flow_id: str, version: int, environment: str = "live") -> fpb.PublishFlowVersionResponse:
    return client.flows.PublishFlowVersion(
        fpb.PublishFlowVersionRequest(flow_id=flow_id, version=version, environment=environment), timeout=TIMEOUT
    )


def list_flow_versions(client, flow_id: str, **fields: Any) -> fpb.ListFlowVersionsResponse:
    return client.flows.ListFlowVersions(fpb.ListFlowVersionsRequest(flow_id=flow_id, **fields), timeout=TIMEOUT)


def walk_flows(client, page_size: int) -> list[list[str]]:
    pages, token = [], ""
    while True:
        response = client.flows.ListFlows(fpb.ListFlowsRequest(page_size=page_size, page_token=token), timeout=TIMEOUT)
        pages.append([f.flow_id for f in response.flows])
        token = response.next_page_token
        if not token:
            return pages
        assert len(pages) < 1000, "paging does not terminate"


def report(client, session_id: str, step_id: str, verdict: str, environment: str = "live") -> session_pb2.Session:
    return client.sessions.ReportStepResult(
        spb.ReportStepResultRequest(environment=environment, session_id=session_id, step_id=step_id, verdict=verdict),
        timeout=TIMEOUT,
    ).session


def forged_token(payload: dict[str, Any]) -> str:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(body + b"\0" * 16).decode().rstrip("=")


# CreateFlow


def test_create_flow_generates_the_id_and_echoes_the_fields(client):
    first = create_flow(client, "kyc", "identity check")
    second = create_flow(client, "kyc", "identity check")
    assert first.flow_id and second.flow_id and first.flow_id != second.flow_id
    assert (first.name, first.description) == ("kyc", "identity check")
    assert first.latest_version == 0
    assert dict(first.published_versions) == {}
    assert first.HasField("create_time") and first.HasField("update_time")
    assert get_flow(client, first.flow_id) == first


def test_create_flow_requires_a_name(client):
    fails(client.flows.CreateFlow, fpb.CreateFlowRequest(name=""), INVALID, fields=("name",))
    assert client.flows.ListFlows(fpb.ListFlowsRequest(), timeout=TIMEOUT).flows == []


@pytest.mark.parametrize(
    "name, description",
    [("n" * 200, ""), ("é" * 200, ""), ("kyc", "d" * 2000), ("kyc", "ü" * 2000)],
    ids=["name-200", "name-200-multibyte", "description-2000", "description-2000-multibyte"],
)
def test_create_flow_accepts_values_on_the_limit(client, name, description):
    flow = create_flow(client, name, description)
    assert (flow.name, flow.description) == (name, description)


@pytest.mark.parametrize(
    "name, description, field",
    [("n" * 201, "", "name"), ("kyc", "d" * 2001, "description")],
    ids=["name-201", "description-2001"],
)
def test_create_flow_refuses_values_over_the_limit(client, name, description, field):
    fails(client.flows.CreateFlow, fpb.CreateFlowRequest(name=name, description=description), INVALID, fields=(field,))
    assert client.flows.ListFlows(fpb.ListFlowsRequest(), timeout=TIMEOUT).flows == []


def test_create_flow_reports_every_violation_at_once(client):
    fails(
        client.flows.CreateFlow,
        fpb.CreateFlowRequest(name="", description="d" * 2001),
        INVALID,
        fields=("name", "description"),
    )


# GetFlow


def test_get_flow_unknown_is_not_found(client):
    err = fails(client.flows.GetFlow, fpb.GetFlowRequest(flow_id="flw_doesnotexist"), NOT_FOUND, "FLOW_NOT_FOUND")
    assert "flw_doesnotexist" in err.message


@pytest.mark.parametrize("flow_id", ["", "not a valid id", "x" * 129], ids=["empty", "bad-chars", "too-long"])
def test_get_flow_refuses_a_malformed_id(client, flow_id):
    fails(client.flows.GetFlow, fpb.GetFlowRequest(flow_id=flow_id), INVALID, fields=("flow_id",))


def test_get_flow_shows_latest_version_and_published_versions_per_environment(client):
    flow = create_flow(client)
    assert get_flow(client, flow.flow_id).latest_version == 0
    for expected in (1, 2, 3):
        assert create_version(client, flow.flow_id).version == expected
        assert get_flow(client, flow.flow_id).latest_version == expected
    assert dict(get_flow(client, flow.flow_id).published_versions) == {}
    publish(client, flow.flow_id, 1, "live")
    assert dict(get_flow(client, flow.flow_id).published_versions) == {"live": 1}
    publish(client, flow.flow_id, 2, "staging")
    assert dict(get_flow(client, flow.flow_id).published_versions) == {"live": 1, "staging": 2}
    publish(client, flow.flow_id, 3, "live")
    got = get_flow(client, flow.flow_id)
    assert dict(got.published_versions) == {"live": 3, "staging": 2}
    assert got.latest_version == 3
    assert (got.name, got.flow_id) == (flow.name, flow.flow_id)


# ListFlows


def test_list_flows_pages_walk_every_flow_exactly_once_oldest_first(client):
    created = [create_flow(client, f"flow-{i}").flow_id for i in range(7)]
    pages = walk_flows(client, page_size=3)
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [fid for page in pages for fid in page] == created
    assert walk_flows(client, page_size=7) == [created]
    assert walk_flows(client, page_size=1) == [[fid] for fid in created]


def test_list_flows_paging_is_exact_when_flows_share_a_create_time(tmp_path):
    server = ServerThread(settings_for(tmp_path), clock=FakeClock(SystemClock().now()))  # a clock that never moves
    try:
        with connect(server.address) as client:
            created = {create_flow(client, f"flow-{i}").flow_id for i in range(7)}
            pages = walk_flows(client, page_size=3)
            seen = [fid for page in pages for fid in page]
            assert [len(p) for p in pages] == [3, 3, 1]
            assert sorted(seen) == sorted(created) and len(seen) == len(set(seen))
    finally:
        server.stop()


def test_list_flows_page_size_zero_means_the_default_of_50(client):
    created = [create_flow(client, f"flow-{i}").flow_id for i in range(51)]
    first = client.flows.ListFlows(fpb.ListFlowsRequest(page_size=0), timeout=TIMEOUT)
    assert [f.flow_id for f in first.flows] == created[:50]
    assert first.next_page_token
    second = client.flows.ListFlows(fpb.ListFlowsRequest(page_token=first.next_page_token), timeout=TIMEOUT)
    assert [f.flow_id for f in second.flows] == created[50:]
    assert second.next_page_token == ""
    everything = client.flows.ListFlows(fpb.ListFlowsRequest(page_size=1000), timeout=TIMEOUT)
    assert [f.flow_id for f in everything.flows] == created
    assert everything.next_page_token == ""


def test_list_flows_with_no_flows_is_empty(client):
    response = client.flows.ListFlows(fpb.ListFlowsRequest(), timeout=TIMEOUT)
    assert list(response.flows) == [] and response.next_page_token == ""


def test_list_flows_items_carry_published_versions(client):
    flow_id = published_flow(client, environment="staging")
    (listed,) = client.flows.ListFlows(fpb.ListFlowsRequest(), timeout=TIMEOUT).flows
    assert listed == get_flow(client, flow_id)
    assert dict(listed.published_versions) == {"staging": 1} and listed.latest_version == 1


@pytest.mark.parametrize("page_size", [-1, -1000, 1001, 2**31 - 1], ids=["-1", "-1000", "1001", "int32-max"])
def test_list_flows_refuses_a_page_size_out_of_range(client, page_size):
    fails(client.flows.ListFlows, fpb.ListFlowsRequest(page_size=page_size), INVALID, fields=("page_size",))


def test_list_flows_refuses_tokens_it_did_not_issue(client):
    for i in range(3):
        create_flow(client, f"flow-{i}")
    real = client.flows.ListFlows(fpb.ListFlowsRequest(page_size=1), timeout=TIMEOUT).next_page_token
    assert real
    middle = len(real) // 2
    tampered = real[:middle] + ("A" if real[middle] != "A" else "B") + real[middle + 1 :]
    for token in [
        "garbage",
        "!!!not base64!!!",
        "QQ",  # valid base64, far too short
        forged_token({"q": "0" * 16, "p": [0, ""]}),
        tampered,
        real + "AAAA",
    ]:
        fails(
            client.flows.ListFlows,
            fpb.ListFlowsRequest(page_size=1, page_token=token),
            INVALID,
            "INVALID_PAGE_TOKEN",
            fields=("page_token",),
        )


def test_list_flows_refuses_a_token_from_list_flow_versions(client):
    flow = create_flow(client)
    create_version(client, flow.flow_id)
    create_version(client, flow.flow_id)
    token = list_flow_versions(client, flow.flow_id, page_size=1).next_page_token
    assert token
    fails(client.flows.ListFlows, fpb.ListFlowsRequest(page_token=token), INVALID, "INVALID_PAGE_TOKEN", fields=("page_token",))


# CreateFlowVersion


def test_create_flow_version_numbers_drafts_1_2_3_with_a_24h_default_timeout(client):
    flow = create_flow(client)
    versions = [create_version(client, flow.flow_id) for _ in range(3)]
    assert [v.version for v in versions] == [1, 2, 3]
    for v in versions:
        assert v.flow_id == flow.flow_id
        assert v.state == DRAFT
        assert v.execution_timeout.ToTimedelta() == timedelta(hours=24)
        assert v.start_step_id == "document"
        assert list(v.steps) == kyc_steps()
        assert not v.HasField("publish_time")
        assert list(v.environments) == []
        assert v.HasField("create_time") and v.HasField("update_time")
        assert get_version(client, flow.flow_id, v.version) == v
    assert get_flow(client, flow.flow_id).latest_version == 3


@pytest.mark.parametrize(
    "timeout",
    [
        duration(1),
        duration(1.5),
        duration(90 * 60),
        duration(30 * 24 * 3600),
        duration_pb2.Duration(seconds=1, nanos=0),
    ],
    ids=["1s", "1.5s", "90min", "30d", "1s-exact"],
)
def test_create_flow_version_accepts_execution_timeouts_in_range(client, timeout):
    flow = create_flow(client)
    version = create_version(client, flow.flow_id, timeout=timeout)
    assert version.execution_timeout == timeout
    assert get_version(client, flow.flow_id, 1).execution_timeout == timeout


@pytest.mark.parametrize(
    "timeout",
    [
        duration(0.5),
        duration_pb2.Duration(seconds=0, nanos=999_999_999),
        duration_pb2.Duration(),  # explicitly set to zero: not "unset"
        duration(-5),
        duration(31 * 24 * 3600),
        duration(30 * 24 * 3600 + 0.000001),
    ],
    ids=["0.5s", "1s-minus-1ns", "zero", "negative", "31d", "30d-plus-1us"],
)
def test_create_flow_version_refuses_execution_timeouts_out_of_range(client, timeout):
    flow = create_flow(client)
    fails(client.flows.CreateFlowVersion, version_request(flow.flow_id, timeout=timeout), INVALID, fields=("execution_timeout",))
    assert get_flow(client, flow.flow_id).latest_version == 0
    assert list(list_flow_versions(client, flow.flow_id).flow_versions) == []


def test_create_flow_version_refuses_30_days_plus_one_nanosecond(client):
    flow = create_flow(client)
    timeout = duration_pb2.Duration(seconds=30 * 24 * 3600, nanos=1)
    fails(client.flows.CreateFlowVersion, version_request(flow.flow_id, timeout=timeout), INVALID, fields=("execution_timeout",))


@pytest.mark.parametrize("rpc", ["CreateFlowVersion", "UpdateFlowVersion"])
def test_a_huge_execution_timeout_is_invalid_argument_not_internal(client, rpc):
    flow = create_flow(client)
    create_version(client, flow.flow_id)
    timeout = duration_pb2.Duration(seconds=10**17)
    if rpc == "CreateFlowVersion":
        request = version_request(flow.flow_id, timeout=timeout)
    else:
        request = _update(flow.flow_id, 1, kyc_steps(), "document", timeout)
    fails(getattr(client.flows, rpc), request, INVALID, fields=("execution_timeout",))


def _s(step_id: str, step_type: str = "check", routes: dict[str, str] | None = None, outcome: int = 0) -> flow_pb2.Step:
    return flow_pb2.Step(step_id=step_id, step_type=step_type, routes=routes or {}, outcome=outcome)


# (start, steps, the field violation expected, text its description must contain: the step it names)
INVALID_GRAPHS = {
    "duplicate-step-id": (
        "a",
        [_s("a", routes={"ok": "b"}), end("b", ACCEPTED), end("b", REJECTED)],
        "steps[2].step_id",
        "'b'",
    ),
    "start-step-missing": ("nope", [_s("a", routes={"ok": "b"}), end("b", ACCEPTED)], "start_step_id", "'nope'"),
    "start-step-is-an-end-step": ("b", [_s("a", routes={"ok": "b"}), end("b", ACCEPTED)], "start_step_id", "'b'"),
    "route-to-unknown-step": (
        "a",
        [_s("a", routes={"ok": "b", "bad": "ghost"}), end("b", ACCEPTED)],
        "steps[0].routes['bad']",
        "'ghost'",
    ),
    "unreachable-step": (
        "a",
        [_s("a", routes={"ok": "b"}), end("b", ACCEPTED), end("island", REJECTED)],
        "steps[2]",
        "'island'",
    ),
    "non-end-step-without-routes": (
        "a",
        [_s("a", routes={"ok": "b", "more": "c"}), end("b", ACCEPTED), _s("c")],
        "steps[2].routes",
        "'c'",
    ),
    "loop-without-an-end": (
        "a",
        [_s("a", routes={"ok": "b", "loop": "c"}), end("b", ACCEPTED), _s("c", routes={"again": "c"})],
        "steps[2].routes",
        "'c'",
    ),
    "end-step-with-routes": (
        "a",
        [_s("a", routes={"ok": "b"}), _s("b", "end", routes={"again": "a"}, outcome=ACCEPTED)],
        "steps[1].routes",
        "'b'",
    ),
    "no-steps": ("a", [], "steps", ""),
    "empty-start-step-id": ("", [_s("a", routes={"ok": "b"}), end("b", ACCEPTED)], "start_step_id", ""),
    "empty-step-id": ("a", [_s("a", routes={"ok": "b"}), end("b", ACCEPTED), _s("", routes={"x": "a"})], "steps[2].step_id", ""),
    "step-id-bad-chars": ("a", [_s("a", routes={"ok": "a b"}), end("a b", ACCEPTED)], "steps[1].step_id", ""),
    "step-id-trailing-newline": ("a", [_s("a", routes={"ok": "b\n"}), end("b\n", ACCEPTED)], "steps[1].step_id", ""),
    "step-id-too-long": (
        "a",
        [_s("a", routes={"ok": "s" * 65}), end("s" * 65, ACCEPTED)],
        "steps[1].step_id",
        "",
    ),
    "empty-step-type": ("a", [_s("a", "", routes={"ok": "b"}), end("b", ACCEPTED)], "steps[0].step_type", ""),
    "step-type-too-long": ("a", [_s("a", "t" * 65, routes={"ok": "b"}), end("b", ACCEPTED)], "steps[0].step_type", ""),
    "verdict-trailing-newline": ("a", [_s("a", routes={"ok\n": "b"}), end("b", ACCEPTED)], "steps[0].routes['ok\\n']", ""),
    "verdict-bad-chars": ("a", [_s("a", routes={"not ok": "b"}), end("b", ACCEPTED)], "steps[0].routes['not ok']", ""),
    "too-many-steps": (
        "s0",
        [_s(f"s{i}", routes={"next": f"s{i + 1}"}) for i in range(200)] + [end("s200", ACCEPTED)],
        "steps",
        "",
    ),
}


@pytest.mark.parametrize("case", list(INVALID_GRAPHS), ids=list(INVALID_GRAPHS))
def test_create_flow_version_refuses_an_invalid_graph_naming_the_step(client, case):
    start, steps, field, named = INVALID_GRAPHS[case]
    flow = create_flow(client)
    err = fails(
        client.flows.CreateFlowVersion,
        version_request(flow.flow_id, steps=steps, start=start),
        INVALID,
        "INVALID_FLOW_GRAPH",
        fields=(field,),
    )
    assert named in description_of(err, field), err.field_violations
    # Nothing was written.
    assert get_flow(client, flow.flow_id).latest_version == 0
    assert list(list_flow_versions(client, flow.flow_id).flow_versions) == []


def test_create_flow_version_accepts_200_steps(client):
    steps = [_s(f"s{i}", routes={"next": f"s{i + 1}"}) for i in range(199)] + [end("s199", ACCEPTED)]
    flow = create_flow(client)
    version = create_version(client, flow.flow_id, steps=steps, start="s0")
    assert len(version.steps) == 200


def test_create_flow_version_refuses_an_unknown_outcome_value(client):
    flow = create_flow(client)
    steps = [_s("a", routes={"ok": "b"}), _s("b", "end", outcome=7)]
    err = fails(client.flows.CreateFlowVersion, version_request(flow.flow_id, steps=steps, start="a"), INVALID, "INVALID_FLOW_GRAPH")
    assert [field for field, _ in err.field_violations] == ["steps[1].outcome"]  # not also "needs a route"
    assert get_flow(client, flow.flow_id).latest_version == 0


def test_a_bad_flow_id_and_timeout_are_reported_with_the_graphs_violations(client):
    steps = [_s("a", routes={"ok": "ghost"}), _s("b", "end", outcome=7)]
    request = version_request("not an id", steps=steps, start="a")
    request.execution_timeout.FromSeconds(0)
    err = fails(client.flows.CreateFlowVersion, request, INVALID, "INVALID_FLOW_GRAPH")
    found = [field for field, _ in err.field_violations]
    for field in ("flow_id", "execution_timeout", "steps[1].outcome", "steps[0].routes['ok']"):
        assert field in found, err.field_violations
    assert found.count("execution_timeout") == 1


def test_create_flow_version_reports_every_graph_violation_at_once(client):
    flow = create_flow(client)
    steps = [_s("a", routes={"ok": "ghost"}), end("b", ACCEPTED), _s("c")]
    err = fails(
        client.flows.CreateFlowVersion,
        version_request(flow.flow_id, steps=steps, start="a"),
        INVALID,
        "INVALID_FLOW_GRAPH",
        fields=("steps[0].routes['ok']", "steps[1]", "steps[2].routes"),
    )
    assert len(err.field_violations) >= 3


def test_create_flow_version_for_an_unknown_flow_is_not_found(client):
    fails(client.flows.CreateFlowVersion, version_request("flw_doesnotexist"), NOT_FOUND, "FLOW_NOT_FOUND")


def test_create_flow_version_refuses_a_malformed_flow_id(client):
    fails(client.flows.CreateFlowVersion, version_request(""), INVALID, fields=("flow_id",))


def test_a_refused_version_does_not_use_up_a_number(client):
    flow = create_flow(client)
    assert create_version(client, flow.flow_id).version == 1
    fails(client.flows.CreateFlowVersion, version_request(flow.flow_id, steps=[]), INVALID, "INVALID_FLOW_GRAPH")
    fails(client.flows.CreateFlowVersion, version_request(flow.flow_id, timeout=duration(0.5)), INVALID)
    assert get_flow(client, flow.flow_id).latest_version == 1
    assert create_version(client, flow.flow_id).version == 2


# UpdateFlowVersion


def _update(flow_id: str, version: int, steps, start: str, timeout: duration_pb2.Duration | None = None):
    request = fpb.UpdateFlowVersionRequest(flow_id=flow_id, version=version, start_step_id=start, steps=steps)
    if timeout is not None:
        request.execution_timeout.CopyFrom(timeout)
    return request


SHORT_STEPS = [step("intro", "welcome", go="done"), end("done", ACCEPTED)]


def test_update_flow_version_replaces_a_draft(client):
    flow = create_flow(client)
    created = create_version(client, flow.flow_id)
    updated = client.flows.UpdateFlowVersion(
        _update(flow.flow_id, 1, SHORT_STEPS, "intro", duration(600)), timeout=TIMEOUT
    ).flow_version
    assert (updated.flow_id, updated.version, updated.state) == (flow.flow_id, 1, DRAFT)
    assert updated.start_step_id == "intro"
    assert list(updated.steps) == SHORT_STEPS
    assert updated.execution_timeout.ToTimedelta() == timedelta(minutes=10)
    assert updated.create_time == created.create_time
    assert updated.update_time.ToDatetime() >= created.update_time.ToDatetime()
    assert get_version(client, flow.flow_id, 1) == updated
    assert get_flow(client, flow.flow_id).latest_version == 1
    # Unset timeout on update: back to the 24 h default.
    again = client.flows.UpdateFlowVersion(_update(flow.flow_id, 1, kyc_steps(), "document"), timeout=TIMEOUT).flow_version
    assert again.execution_timeout.ToTimedelta() == timedelta(hours=24)
    assert list(again.steps) == kyc_steps()
    # The updated draft is what gets published and run.
    client.flows.UpdateFlowVersion(_update(flow.flow_id, 1, SHORT_STEPS, "intro"), timeout=TIMEOUT)
    publish(client, flow.flow_id, 1)
    session = new_session(client, flow.flow_id).session
    assert (session.current_step_id, session.current_step_type) == ("intro", "welcome")


def test_update_flow_version_refuses_a_published_version_and_keeps_it(client):
    flow = create_flow(client)
    create_version(client, flow.flow_id)
    publish(client, flow.flow_id, 1)
    before = get_version(client, flow.flow_id, 1)
    fails(
        client.flows.UpdateFlowVersion,
        _update(flow.flow_id, 1, SHORT_STEPS, "intro", duration(60)),
        FAILED_PRECONDITION,
        "FLOW_VERSION_PUBLISHED",
    )
    assert get_version(client, flow.flow_id, 1) == before


def test_update_flow_version_refuses_a_version_published_then_replaced(client):
    flow = create_flow(client)
    create_version(client, flow.flow_id)
    create_version(client, flow.flow_id)
    publish(client, flow.flow_id, 1)
    publish(client, flow.flow_id, 2)  # v1 runs nowhere now, and is still frozen
    before = get_version(client, flow.flow_id, 1)
    assert before.state == PUBLISHED and list(before.environments) == []
    fails(client.flows.UpdateFlowVersion, _update(flow.flow_id, 1, SHORT_STEPS, "intro"), FAILED_PRECONDITION, "FLOW_VERSION_PUBLISHED")
    assert get_version(client, flow.flow_id, 1) == before


def test_update_flow_version_refuses_an_invalid_graph_and_keeps_the_draft(client):
    flow = create_flow(client)
    before = create_version(client, flow.flow_id)
    err = fails(
        client.flows.UpdateFlowVersion,
        _update(flow.flow_id, 1, [step("a", ok="ghost")], "a"),
        INVALID,
        "INVALID_FLOW_GRAPH",
        fields=("steps[0].routes['ok']",),
    )
    assert "'ghost'" in description_of(err, "steps[0].routes['ok']")
    fails(client.flows.UpdateFlowVersion, _update(flow.flow_id, 1, kyc_steps(), "document", duration(0.5)), INVALID, fields=("execution_timeout",))
    assert get_version(client, flow.flow_id, 1) == before


def test_update_flow_version_unknown_version_or_flow_is_not_found(client):
    flow = create_flow(client)
    create_version(client, flow.flow_id)
    fails(client.flows.UpdateFlowVersion, _update(flow.flow_id, 2, kyc_steps(), "document"), NOT_FOUND, "FLOW_VERSION_NOT_FOUND")
    fails(client.flows.UpdateFlowVersion, _update("flw_doesnotexist", 1, kyc_steps(), "document"), NOT_FOUND, "FLOW_NOT_FOUND")
    assert get_flow(client, flow.flow_id).latest_version == 1


@pytest.mark.parametrize("version", [0, -1])
def test_update_flow_version_refuses_a_non_positive_version(client, version):
    flow = create_flow(client)
    fails(client.flows.UpdateFlowVersion, _update(flow.flow_id, version, kyc_steps(), "document"), INVALID, fields=("version",))


# PublishFlowVersion


def test_publish_freezes_the_version_and_records_the_environment(client):
    flow = create_flow(client)
    create_version(client, flow.flow_id)
    response = publish(client, flow.flow_id, 1, "live")
    fv = response.flow_version
    assert (fv.flow_id, fv.version, fv.state) == (flow.flow_id, 1, PUBLISHED)
    assert fv.HasField("publish_time")
    assert list(fv.environments) == ["live"]
    assert response.flow.flow_id == flow.flow_id
    assert dict(response.flow.published_versions) == {"live": 1}
    assert get_version(client, flow.flow_id, 1) == fv
    assert get_flow(client, flow.flow_id) == response.flow


def test_publish_to_a_second_environment_keeps_the_first_publish_time(client):
    flow = create_flow(client)
    create_version(client, flow.flow_id)
    first = publish(client, flow.flow_id, 1, "live").flow_version
    second = publish(client, flow.flow_id, 1, "staging")
    assert sorted(second.flow_version.environments) == ["live", "staging"]
    assert second.flow_version.publish_time == first.publish_time
    assert dict(second.flow.published_versions) == {"live": 1, "staging": 1}
    # Publishing again to the same environment is harmless.
    again = publish(client, flow.flow_id, 1, "live")
    assert sorted(again.flow_version.environments) == ["live", "staging"]
    assert dict(again.flow.published_versions) == {"live": 1, "staging": 1}


def test_publishing_another_version_moves_the_environment(client):
    flow = create_flow(client)
    create_version(client, flow.flow_id)
    create_version(client, flow.flow_id)
    publish(client, flow.flow_id, 1, "live")
    publish(client, flow.flow_id, 1, "staging")
    response = publish(client, flow.flow_id, 2, "live")
    assert list(response.flow_version.environments) == ["live"]
    assert dict(response.flow.published_versions) == {"live": 2, "staging": 1}
    v1 = get_version(client, flow.flow_id, 1)
    assert v1.state == PUBLISHED and list(v1.environments) == ["staging"]
    # And back (a rollback): v1 runs in live again.
    back = publish(client, flow.flow_id, 1, "live")
    assert sorted(back.flow_version.environments) == ["live", "staging"]
    assert list(get_version(client, flow.flow_id, 2).environments) == []
    assert get_version(client, flow.flow_id, 2).state == PUBLISHED


@pytest.mark.parametrize("environment", ["prod", "", "LIVE", "e" * 65], ids=["unknown", "empty", "case", "too-long"])
def test_publish_to_an_unknown_environment_is_refused_and_writes_nothing(client, environment):
    flow = create_flow(client)
    create_version(client, flow.flow_id)
    fails(
        client.flows.PublishFlowVersion,
        fpb.PublishFlowVersionRequest(flow_id=flow.flow_id, version=1, environment=environment),
        INVALID,
        fields=("environment",),
    )
    fv = get_version(client, flow.flow_id, 1)
    assert fv.state == DRAFT and not fv.HasField("publish_time") and list(fv.environments) == []
    assert dict(get_flow(client, flow.flow_id).published_versions) == {}


def test_publish_unknown_version_or_flow_is_not_found(client):
    flow = create_flow(client)
    create_version(client, flow.flow_id)
    fails(
        client.flows.PublishFlowVersion,
        fpb.PublishFlowVersionRequest(flow_id=flow.flow_id, version=2, environment="live"),
        NOT_FOUND,
        "FLOW_VERSION_NOT_FOUND",
    )
    fails(
        client.flows.PublishFlowVersion,
        fpb.PublishFlowVersionRequest(flow_id="flw_doesnotexist", version=1, environment="live"),
        NOT_FOUND,
        "FLOW_NOT_FOUND",
    )
    fails(
        client.flows.PublishFlowVersion,
        fpb.PublishFlowVersionRequest(flow_id=flow.flow_id, version=0, environment="live"),
        INVALID,
        fields=("version",),
    )
    assert dict(get_flow(client, flow.flow_id).published_versions) == {}


V2_STEPS = [
    # v2 starts elsewhere and knows no "ok" verdict on "document".
    step("consent", "consent", agree="document"),
    step("document", "document_check", passed="accepted", failed="rejected"),
    end("accepted", ACCEPTED),
    end("rejected", REJECTED),
]


def test_publishing_v2_switches_only_new_sessions(client):
    flow = create_flow(client)
    create_version(client, flow.flow_id, timeout=duration(3600))
    publish(client, flow.flow_id, 1, "live")
    old = new_session(client, flow.flow_id).session
    assert (old.flow_version, old.current_step_id) == (1, "document")

    create_version(client, flow.flow_id, steps=V2_STEPS, start="consent", timeout=duration(7200))
    publish(client, flow.flow_id, 2, "live")

    new = new_session(client, flow.flow_id).session
    assert (new.flow_version, new.current_step_id, new.current_step_type) == (2, "consent", "consent")
    assert new.expire_time.ToDatetime() - new.create_time.ToDatetime() == timedelta(hours=2)

    # The old session keeps version 1 and routes by v1's graph ("ok" -> liveness), a verdict v2 lacks.
    got = client.sessions.GetSession(spb.GetSessionRequest(environment="live", session_id=old.session_id), timeout=TIMEOUT).session
    assert got.flow_version == 1
    assert got.expire_time.ToDatetime() - got.create_time.ToDatetime() == timedelta(hours=1)
    moved = report(client, old.session_id, "document", "ok")
    assert (moved.flow_version, moved.current_step_id, moved.status) == (1, "liveness", session_pb2.SESSION_STATUS_RUNNING)
    done = report(client, old.session_id, "liveness", "ok")
    assert (done.status, done.outcome, done.flow_version) == (session_pb2.SESSION_STATUS_COMPLETED, ACCEPTED, 1)

    # The new session routes by v2's graph: v1's verdict is unknown there, v2's works.
    report(client, new.session_id, "consent", "agree")
    fails(
        client.sessions.ReportStepResult,
        spb.ReportStepResultRequest(environment="live", session_id=new.session_id, step_id="document", verdict="ok"),
        INVALID,
        "UNKNOWN_VERDICT",
        fields=("verdict",),
    )
    finished = report(client, new.session_id, "document", "failed")
    assert (finished.status, finished.outcome, finished.flow_version) == (session_pb2.SESSION_STATUS_COMPLETED, REJECTED, 2)


def test_publishing_to_staging_leaves_live_sessions_on_their_version(client):
    flow = create_flow(client)
    create_version(client, flow.flow_id)
    create_version(client, flow.flow_id, steps=V2_STEPS, start="consent")
    publish(client, flow.flow_id, 1, "live")
    publish(client, flow.flow_id, 2, "staging")
    assert new_session(client, flow.flow_id, "live").session.flow_version == 1
    assert new_session(client, flow.flow_id, "staging").session.flow_version == 2


# GetFlowVersion


def test_get_flow_version_returns_each_version(client):
    flow = create_flow(client)
    v1 = create_version(client, flow.flow_id)
    v2 = create_version(client, flow.flow_id, steps=SHORT_STEPS, start="intro", timeout=duration(5))
    assert get_version(client, flow.flow_id, 1) == v1
    assert get_version(client, flow.flow_id, 2) == v2
    assert list(get_version(client, flow.flow_id, 2).steps) == SHORT_STEPS


def test_get_flow_version_errors(client):
    flow = create_flow(client)
    create_version(client, flow.flow_id)
    fails(client.flows.GetFlowVersion, fpb.GetFlowVersionRequest(flow_id=flow.flow_id, version=2), NOT_FOUND, "FLOW_VERSION_NOT_FOUND")
    fails(client.flows.GetFlowVersion, fpb.GetFlowVersionRequest(flow_id="flw_doesnotexist", version=1), NOT_FOUND, "FLOW_NOT_FOUND")
    fails(client.flows.GetFlowVersion, fpb.GetFlowVersionRequest(flow_id=flow.flow_id, version=0), INVALID, fields=("version",))
    fails(client.flows.GetFlowVersion, fpb.GetFlowVersionRequest(flow_id=flow.flow_id, version=-3), INVALID, fields=("version",))
    fails(client.flows.GetFlowVersion, fpb.GetFlowVersionRequest(flow_id="", version=1), INVALID, fields=("flow_id",))


# ListFlowVersions


def test_list_flow_versions_pages_lowest_first_exactly_once(client):
    flow = create_flow(client)
    versions = [create_version(client, flow.flow_id) for _ in range(5)]
    publish(client, flow.flow_id, 2, "live")
    pages, token = [], ""
    while True:
        response = list_flow_versions(client, flow.flow_id, page_size=2, page_token=token)
        pages.append([v.version for v in response.flow_versions])
        token = response.next_page_token
        if not token:
            break
    assert pages == [[1, 2], [3, 4], [5]]
    everything = list_flow_versions(client, flow.flow_id)  # page_size 0: the default (50)
    assert [v.version for v in everything.flow_versions] == [1, 2, 3, 4, 5]
    assert everything.next_page_token == ""
    assert everything.flow_versions[1] == get_version(client, flow.flow_id, 2)
    assert everything.flow_versions[1].state == PUBLISHED and list(everything.flow_versions[1].environments) == ["live"]
    assert everything.flow_versions[0] == versions[0]
    exact = list_flow_versions(client, flow.flow_id, page_size=5)
    assert [v.version for v in exact.flow_versions] == [1, 2, 3, 4, 5] and exact.next_page_token == ""
    assert [v.version for v in list_flow_versions(client, flow.flow_id, page_size=1000).flow_versions] == [1, 2, 3, 4, 5]


def test_list_flow_versions_of_a_flow_without_versions_is_empty(client):
    flow = create_flow(client)
    response = list_flow_versions(client, flow.flow_id)
    assert list(response.flow_versions) == [] and response.next_page_token == ""


def test_list_flow_versions_errors(client):
    flow = create_flow(client)
    other = create_flow(client, "other")
    for f in (flow, other):
        create_version(client, f.flow_id)
        create_version(client, f.flow_id)
    fails(client.flows.ListFlowVersions, fpb.ListFlowVersionsRequest(flow_id="flw_doesnotexist"), NOT_FOUND, "FLOW_NOT_FOUND")
    fails(client.flows.ListFlowVersions, fpb.ListFlowVersionsRequest(flow_id=""), INVALID, fields=("flow_id",))
    for size in (-1, 1001):
        fails(
            client.flows.ListFlowVersions,
            fpb.ListFlowVersionsRequest(flow_id=flow.flow_id, page_size=size),
            INVALID,
            fields=("page_size",),
        )
    other_token = list_flow_versions(client, other.flow_id, page_size=1).next_page_token
    flows_token = client.flows.ListFlows(fpb.ListFlowsRequest(page_size=1), timeout=TIMEOUT).next_page_token
    assert other_token and flows_token
    for token in (other_token, flows_token, "garbage", forged_token({"q": "0" * 16, "p": [0]})):
        fails(
            client.flows.ListFlowVersions,
            fpb.ListFlowVersionsRequest(flow_id=flow.flow_id, page_token=token),
            INVALID,
            "INVALID_PAGE_TOKEN",
            fields=("page_token",),
        )
