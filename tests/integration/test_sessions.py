"""SessionService unary RPCs over a real server: every verb, every limit and every documented error code.

Every failure is also checked for google.rpc.ErrorInfo with domain "flowsession" (see ``fails``), and
every refused change is checked to have written nothing (the session's version and state unchanged).
"""
from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc
import jwt
import pytest
from flowsession.client import connect
from flowsession.v1 import flow_pb2, session_pb2
from flowsession.v1 import flow_service_pb2 as fpb
from flowsession.v1 import session_service_pb2 as spb
from flowsession_server.clock import FakeClock, SystemClock
from google.protobuf import struct_pb2

from ..support import (
    expect_error,
    ACCEPTED,
    REJECTED,
    TIMEOUT,
    ServerThread,
    new_session,
    published_flow,
    settings_for,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
ABORTED_CODE = grpc.StatusCode.ABORTED

RUNNING = session_pb2.SESSION_STATUS_RUNNING
COMPLETED = session_pb2.SESSION_STATUS_COMPLETED
ABORTED = session_pb2.SESSION_STATUS_ABORTED
EXPIRED = session_pb2.SESSION_STATUS_EXPIRED
ERROR = session_pb2.SESSION_STATUS_ERROR
UNSPECIFIED_OUTCOME = flow_pb2.SESSION_OUTCOME_UNSPECIFIED


# helpers


fails = expect_error


def get(client, session_id: str, environment: str = "live") -> session_pb2.Session:
    return client.sessions.GetSession(spb.GetSessionRequest(environment=environment, session_id=session_id), timeout=TIMEOUT).session


def report_request(session_id: str, step_id: str, verdict: str, environment: str = "live", **fields: Any):
    return spb.ReportStepResultRequest(environment=environment, session_id=session_id, step_id=step_id, verdict=verdict, **fields)


def report(client, session_id: str, step_id: str, verdict: str, environment: str = "live", **fields: Any) -> session_pb2.Session:
    return client.sessions.ReportStepResult(report_request(session_id, step_id, verdict, environment, **fields), timeout=TIMEOUT).session


def abort(client, session_id: str, reason: str = "user left", environment: str = "live", **fields: Any) -> session_pb2.Session:
    return client.sessions.AbortSession(
        spb.AbortSessionRequest(environment=environment, session_id=session_id, reason=reason, **fields), timeout=TIMEOUT
    ).session


def fail(client, session_id: str, error_code: str = "provider_down", environment: str = "live", **fields: Any):
    return client.sessions.FailSession(
        spb.FailSessionRequest(environment=environment, session_id=session_id, error_code=error_code, **fields),
        timeout=TIMEOUT,
    ).session


def list_sessions(client, environment: str = "live", **fields: Any) -> spb.ListSessionsResponse:
    return client.sessions.ListSessions(spb.ListSessionsRequest(environment=environment, **fields), timeout=TIMEOUT)


def walk_sessions(client, environment: str = "live", **fields: Any) -> list[list[str]]:
    pages, token = [], ""
    while True:
        response = list_sessions(client, environment, page_token=token, **fields)
        pages.append([s.session_id for s in response.sessions])
        token = response.next_page_token
        if not token:
            return pages
        assert len(pages) < 1000, "paging does not terminate"


def all_session_ids(client, environment: str = "live") -> list[str]:
    return [s.session_id for s in list_sessions(client, environment, page_size=1000).sessions]


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


def input_of_size(size: int) -> struct_pb2.Struct:
    """A Struct whose serialized size is exactly ``size`` bytes."""
    s = struct_pb2.Struct()
    n = size - 16
    while True:
        s.fields["blob"].string_value = "x" * n
        got = s.ByteSize()
        if got == size:
            return s
        n += size - got
        assert n > 0


@pytest.fixture
def clocked(tmp_path):
    """A real server on a fake clock, for expiry without waiting: yields (client, clock)."""
    clock = FakeClock(SystemClock().now())
    server = ServerThread(settings_for(tmp_path), clock=clock)
    try:
        with connect(server.address) as c:
            yield c, clock
    finally:
        server.stop()


# CreateSession


def test_create_session_starts_running_at_the_start_step(client):
    flow_id = published_flow(client, timeout_s=90)
    inp = {"name": "Ada", "age": 36, "tags": ["a", "b"], "address": {"city": "London", "zip": None}, "adult": True}
    created = new_session(
        client,
        flow_id,
        metadata={"customer": "c-1", "channel": "web"},
        redirect_url="https://example.com/done?x=1",
        state="opaque-state-Ω",
        input=struct(inp),
    )
    s = created.session
    assert s.session_id and s.flow_id == flow_id and s.environment == "live"
    assert (s.status, s.outcome, s.flow_version, s.version) == (RUNNING, UNSPECIFIED_OUTCOME, 1, 1)
    assert (s.current_step_id, s.current_step_type) == ("document", "document_check")
    assert not s.HasField("last_step") and not s.HasField("end_time") and not s.HasField("error")
    assert s.abort_reason == ""
    assert s.create_time == s.update_time
    assert s.expire_time.ToDatetime() - s.create_time.ToDatetime() == timedelta(seconds=90)
    assert dict(s.metadata) == {"customer": "c-1", "channel": "web"}
    assert s.redirect_url == "https://example.com/done?x=1"
    assert s.state == "opaque-state-Ω"
    assert s.input == struct(inp)
    assert get(client, s.session_id) == s


def test_create_session_expire_time_uses_the_default_24h_timeout(client):
    flow_id = published_flow(client)
    s = new_session(client, flow_id).session
    assert s.expire_time.ToDatetime() - s.create_time.ToDatetime() == timedelta(hours=24)
    assert not s.HasField("input") or len(s.input.fields) == 0
    assert dict(s.metadata) == {} and s.redirect_url == "" and s.state == ""


@pytest.mark.parametrize("environment", ["live", "staging"])
def test_session_token_is_a_jwt_for_the_session(client, environment):
    flow_id = published_flow(client, environment=environment, timeout_s=3600)
    created = new_session(client, flow_id, environment)
    assert jwt.get_unverified_header(created.session_token)["alg"] == "HS256"
    claims = jwt.decode(created.session_token, options={"verify_signature": False})
    s = created.session
    assert claims["sub"] == s.session_id
    assert claims["env"] == environment
    assert claims["exp"] == int(s.expire_time.seconds)
    assert claims["iat"] == int(s.create_time.seconds)


def test_sessions_get_distinct_ids_and_tokens(client):
    flow_id = published_flow(client)
    a, b = new_session(client, flow_id), new_session(client, flow_id)
    assert a.session.session_id != b.session.session_id
    assert a.session_token != b.session_token


def test_create_session_where_nothing_is_published_is_failed_precondition(client):
    flow_id = published_flow(client, environment="live")
    fails(
        client.sessions.CreateSession,
        spb.CreateSessionRequest(flow_id=flow_id, environment="staging"),
        FAILED_PRECONDITION,
        "FLOW_NOT_PUBLISHED",
    )
    draft_only = client.flows.CreateFlow(fpb.CreateFlowRequest(name="draft"), timeout=TIMEOUT).flow.flow_id
    client.flows.CreateFlowVersion(
        fpb.CreateFlowVersionRequest(flow_id=draft_only, start_step_id="a", steps=[flow_step("a", ok="b"), end_step("b")]),
        timeout=TIMEOUT,
    )
    fails(client.sessions.CreateSession, spb.CreateSessionRequest(flow_id=draft_only, environment="live"), FAILED_PRECONDITION, "FLOW_NOT_PUBLISHED")
    assert all_session_ids(client, "staging") == [] and all_session_ids(client, "live") == []


def flow_step(step_id: str, **routes: str):
    return flow_pb2.Step(step_id=step_id, step_type="check", routes=routes)


def end_step(step_id: str, outcome: int = ACCEPTED):
    return flow_pb2.Step(step_id=step_id, step_type="end", outcome=outcome)


def test_create_session_for_an_unknown_flow_is_not_found(client):
    fails(
        client.sessions.CreateSession,
        spb.CreateSessionRequest(flow_id="flw_doesnotexist", environment="live"),
        NOT_FOUND,
        "FLOW_NOT_FOUND",
    )


REFUSED_CREATES = {
    "state-2049": ({"state": "s" * 2049}, "state"),
    "state-2049-multibyte": ({"state": "é" * 2049}, "state"),
    "redirect-ftp": ({"redirect_url": "ftp://example.com/x"}, "redirect_url"),
    "redirect-relative": ({"redirect_url": "/done"}, "redirect_url"),
    "redirect-no-scheme": ({"redirect_url": "example.com/done"}, "redirect_url"),
    "redirect-no-host": ({"redirect_url": "https://"}, "redirect_url"),
    "redirect-javascript": ({"redirect_url": "javascript:alert(1)"}, "redirect_url"),
    "redirect-2049": ({"redirect_url": "https://example.com/" + "a" * (2049 - len("https://example.com/"))}, "redirect_url"),
    # urlsplit drops leading control characters before parsing: these passed, and were stored as sent.
    "redirect-leading-nul": ({"redirect_url": "\x00https://example.com/done"}, "redirect_url"),
    "redirect-nul-in-host": ({"redirect_url": "https://exa\x00mple.com/"}, "redirect_url"),
    "redirect-backspace": ({"redirect_url": "https://example.com\x08/"}, "redirect_url"),
    "redirect-del": ({"redirect_url": "https://a/\x7f"}, "redirect_url"),
    "redirect-c1": ({"redirect_url": "https://a/\x85done"}, "redirect_url"),
    "metadata-51-entries": ({"metadata": {f"k{i}": "v" for i in range(51)}}, "metadata"),
    "metadata-empty-key": ({"metadata": {"": "v"}}, "metadata"),
    "metadata-key-65": ({"metadata": {"k" * 65: "v"}}, "metadata"),
    "metadata-value-513": ({"metadata": {"k": "v" * 513}}, "metadata"),
    "environment-unknown": ({"environment": "prod"}, "environment"),
    "environment-empty": ({"environment": ""}, "environment"),
    "request-id-129": ({"request_id": "r" * 129}, "request_id"),
    "flow-id-empty": ({"flow_id": ""}, "flow_id"),
}


@pytest.mark.parametrize("case", list(REFUSED_CREATES), ids=list(REFUSED_CREATES))
def test_create_session_refuses_values_beyond_the_limits(client, case):
    changes, field = REFUSED_CREATES[case]
    flow_id = published_flow(client)
    request = spb.CreateSessionRequest(**{"flow_id": flow_id, "environment": "live", **changes})
    fails(client.sessions.CreateSession, request, INVALID, prefix_fields=(field,))
    assert all_session_ids(client) == []


@pytest.mark.parametrize(
    "url",
    ["https://:80/done", "http://user@/done", "https://exa mple.com/done", "https://example.com:99999/done", "https://example.com:x/"],
    ids=["port-only", "userinfo-only", "space-in-host", "port-out-of-range", "port-not-a-number"],
)
def test_create_session_refuses_a_redirect_url_without_a_valid_host(client, url):
    flow_id = published_flow(client)
    request = spb.CreateSessionRequest(flow_id=flow_id, environment="live", redirect_url=url)
    fails(client.sessions.CreateSession, request, INVALID, fields=("redirect_url",))


def test_create_session_refuses_input_over_256_kib(client):
    flow_id = published_flow(client)
    big = input_of_size(256 * 1024 + 1)
    fails(client.sessions.CreateSession, spb.CreateSessionRequest(flow_id=flow_id, environment="live", input=big), INVALID, fields=("input",))
    assert all_session_ids(client) == []


def test_create_session_accepts_input_of_exactly_256_kib(client):
    flow_id = published_flow(client)
    exact = input_of_size(256 * 1024)
    assert exact.ByteSize() == 256 * 1024
    s = new_session(client, flow_id, input=exact).session
    assert s.input == exact
    assert get(client, s.session_id).input == exact


@pytest.mark.parametrize("number", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_create_session_refuses_a_non_finite_number_in_input_without_internal(client, number):
    flow_id = published_flow(client)
    inp = struct_pb2.Struct()
    inp.fields["score"].number_value = number
    fails(client.sessions.CreateSession, spb.CreateSessionRequest(flow_id=flow_id, environment="live", input=inp), INVALID, fields=("input",))


def test_create_session_accepts_values_on_the_limits(client):
    flow_id = published_flow(client)
    url = "https://example.com/" + "a" * (2048 - len("https://example.com/"))
    metadata = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(50)}
    assert len(url) == 2048 and all(len(k) == 64 for k in metadata)
    created = new_session(client, flow_id, state="é" * 2048, redirect_url=url, metadata=metadata, request_id="r" * 128)
    s = created.session
    assert s.state == "é" * 2048 and s.redirect_url == url and dict(s.metadata) == metadata
    assert get(client, s.session_id) == s
    plain = new_session(client, flow_id, state="s" * 2048, redirect_url="http://localhost:8080/cb").session
    assert plain.redirect_url == "http://localhost:8080/cb" and plain.state == "s" * 2048


def test_create_session_reports_every_violation_at_once(client):
    flow_id = published_flow(client)
    fails(
        client.sessions.CreateSession,
        spb.CreateSessionRequest(flow_id=flow_id, environment="live", state="s" * 2049, request_id="r" * 129, redirect_url="nope"),
        INVALID,
        fields=("state", "request_id", "redirect_url"),
    )


# Idempotent create


def test_create_session_with_the_same_request_id_and_request_returns_the_same_session(client):
    flow_id = published_flow(client)
    fields = dict(request_id="req-1", state="st", metadata={"a": "1", "b": "2"}, input=struct({"x": [1, 2], "y": {"z": "w"}}))
    first = new_session(client, flow_id, **fields)
    again = new_session(client, flow_id, **fields)
    assert again.session.session_id == first.session.session_id
    assert again.session_token == first.session_token
    assert again.session == first.session
    assert all_session_ids(client) == [first.session.session_id]


def test_create_session_retry_with_an_empty_input_set_or_unset_is_the_same_request(client):
    """Both store no input: generated code in one language may send the empty Struct, in another not."""
    flow_id = published_flow(client)
    unset = spb.CreateSessionRequest(flow_id=flow_id, environment="live", request_id="req-1")
    first = client.sessions.CreateSession(unset, timeout=TIMEOUT)
    empty = spb.CreateSessionRequest(flow_id=flow_id, environment="live", request_id="req-1")
    empty.input.SetInParent()
    again = client.sessions.CreateSession(empty, timeout=TIMEOUT)
    assert (again.session, again.session_token) == (first.session, first.session_token)


@pytest.mark.parametrize(
    "changed",
    [{"state": "other"}, {"metadata": {"a": "2"}}, {"redirect_url": "https://example.com/"}, {"input": struct({"x": 1})}],
    ids=["state", "metadata", "redirect_url", "input"],
)
def test_create_session_with_the_same_request_id_and_another_request_is_already_exists(client, changed):
    flow_id = published_flow(client)
    first = new_session(client, flow_id, request_id="req-1", state="st")
    request = spb.CreateSessionRequest(flow_id=flow_id, environment="live", request_id="req-1", **{"state": "st", **changed})
    fails(client.sessions.CreateSession, request, ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert all_session_ids(client) == [first.session.session_id]


def test_create_session_same_request_id_for_another_flow_is_already_exists(client):
    flow_a, flow_b = published_flow(client), published_flow(client)
    new_session(client, flow_a, request_id="req-1")
    fails(
        client.sessions.CreateSession,
        spb.CreateSessionRequest(flow_id=flow_b, environment="live", request_id="req-1"),
        ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
    )


def test_create_session_without_request_id_never_deduplicates(client):
    flow_id = published_flow(client)
    ids = {new_session(client, flow_id, state="same").session.session_id for _ in range(3)}
    assert len(ids) == 3
    assert sorted(all_session_ids(client)) == sorted(ids)


def test_idempotent_create_still_holds_after_the_session_has_ended(client):
    flow_id = published_flow(client)
    first = new_session(client, flow_id, request_id="req-1", state="st")
    sid = first.session.session_id
    abort(client, sid)
    again = new_session(client, flow_id, request_id="req-1", state="st")
    assert again.session.session_id == sid
    assert again.session_token == first.session_token
    fails(
        client.sessions.CreateSession,
        spb.CreateSessionRequest(flow_id=flow_id, environment="live", request_id="req-1", state="changed"),
        ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
    )
    assert all_session_ids(client) == [sid]
    assert get(client, sid).status == ABORTED and get(client, sid).version == 2


def test_idempotent_create_still_holds_after_a_new_version_is_published(client):
    flow_id = published_flow(client)
    first = new_session(client, flow_id, request_id="req-1")
    client.flows.CreateFlowVersion(
        fpb.CreateFlowVersionRequest(flow_id=flow_id, start_step_id="a", steps=[flow_step("a", ok="b"), end_step("b")]),
        timeout=TIMEOUT,
    )
    client.flows.PublishFlowVersion(fpb.PublishFlowVersionRequest(flow_id=flow_id, version=2, environment="live"), timeout=TIMEOUT)
    again = new_session(client, flow_id, request_id="req-1")
    assert again.session.session_id == first.session.session_id and again.session.flow_version == 1
    assert again.session_token == first.session_token


# GetSession


def test_get_session_of_another_environment_or_unknown_is_not_found(client):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id, "live").session.session_id
    fails(client.sessions.GetSession, spb.GetSessionRequest(environment="staging", session_id=sid), NOT_FOUND, "SESSION_NOT_FOUND")
    fails(
        client.sessions.GetSession,
        spb.GetSessionRequest(environment="live", session_id="ses_doesnotexist"),
        NOT_FOUND,
        "SESSION_NOT_FOUND",
    )
    fails(client.sessions.GetSession, spb.GetSessionRequest(environment="live", session_id=""), INVALID, fields=("session_id",))
    fails(client.sessions.GetSession, spb.GetSessionRequest(environment="prod", session_id=sid), INVALID, fields=("environment",))
    assert get(client, sid).version == 1


def test_verbs_on_another_environments_session_are_not_found_and_write_nothing(client):
    flow_id = published_flow(client)
    before = new_session(client, flow_id, "live").session
    sid = before.session_id
    fails(client.sessions.ReportStepResult, report_request(sid, "document", "ok", "staging"), NOT_FOUND, "SESSION_NOT_FOUND")
    fails(
        client.sessions.AbortSession,
        spb.AbortSessionRequest(environment="staging", session_id=sid, reason="r"),
        NOT_FOUND,
        "SESSION_NOT_FOUND",
    )
    fails(
        client.sessions.FailSession,
        spb.FailSessionRequest(environment="staging", session_id=sid, error_code="e"),
        NOT_FOUND,
        "SESSION_NOT_FOUND",
    )
    assert get(client, sid) == before
    assert all_session_ids(client, "staging") == []


def test_verbs_on_an_unknown_session_are_not_found(client):
    sid = "ses_doesnotexist"
    fails(client.sessions.ReportStepResult, report_request(sid, "document", "ok"), NOT_FOUND, "SESSION_NOT_FOUND")
    fails(client.sessions.AbortSession, spb.AbortSessionRequest(environment="live", session_id=sid, reason="r"), NOT_FOUND, "SESSION_NOT_FOUND")
    fails(client.sessions.FailSession, spb.FailSessionRequest(environment="live", session_id=sid, error_code="e"), NOT_FOUND, "SESSION_NOT_FOUND")


# ListSessions


@pytest.fixture
def population(client):
    """Two flows in live (A: 3 sessions, one aborted; B: 2, one completed) and one staging session of A."""
    flow_a = published_flow(client)
    flow_b = published_flow(client)
    client.flows.PublishFlowVersion(fpb.PublishFlowVersionRequest(flow_id=flow_a, version=1, environment="staging"), timeout=TIMEOUT)
    created = []  # live sessions, in creation order
    for flow_id in (flow_a, flow_b, flow_a, flow_b, flow_a):
        created.append(new_session(client, flow_id).session.session_id)
    staging = new_session(client, flow_a, "staging").session.session_id
    abort(client, created[2])
    report(client, created[3], "document", "bad")  # -> COMPLETED (REJECTED)
    return {"a": flow_a, "b": flow_b, "live": created, "staging": staging}


def test_list_sessions_newest_first_and_only_the_environments_own(client, population):
    response = list_sessions(client)
    sessions = list(response.sessions)
    assert [s.session_id for s in sessions] == population["live"][::-1]
    keys = [(s.create_time.ToNanoseconds(), s.session_id) for s in sessions]
    assert keys == sorted(keys, reverse=True)
    assert response.next_page_token == ""
    assert all(s.environment == "live" for s in sessions)
    assert sessions[0] == get(client, sessions[0].session_id)
    assert all_session_ids(client, "staging") == [population["staging"]]


def test_list_sessions_filters_by_flow_and_status(client, population):
    live, a, b = population["live"], population["a"], population["b"]
    assert all_session_ids_filtered(client, flow_id=a) == [live[4], live[2], live[0]]
    assert all_session_ids_filtered(client, flow_id=b) == [live[3], live[1]]
    assert all_session_ids_filtered(client, statuses=[ABORTED]) == [live[2]]
    assert all_session_ids_filtered(client, statuses=[COMPLETED]) == [live[3]]
    assert all_session_ids_filtered(client, statuses=[RUNNING]) == [live[4], live[1], live[0]]
    assert all_session_ids_filtered(client, statuses=[COMPLETED, ABORTED]) == [live[3], live[2]]
    assert all_session_ids_filtered(client, statuses=[EXPIRED, ERROR]) == []
    assert all_session_ids_filtered(client, flow_id=a, statuses=[RUNNING]) == [live[4], live[0]]
    assert all_session_ids_filtered(client, flow_id=b, statuses=[ABORTED]) == []
    assert all_session_ids_filtered(client, "staging", flow_id=b) == []
    assert all_session_ids_filtered(client, "staging", flow_id=a) == [population["staging"]]
    assert all_session_ids_filtered(client, flow_id="flw_doesnotexist") == []


def all_session_ids_filtered(client, environment: str = "live", **fields: Any) -> list[str]:
    return [s.session_id for s in list_sessions(client, environment, page_size=1000, **fields).sessions]


def test_list_sessions_pages_walk_every_session_exactly_once(client, population):
    live = population["live"]
    pages = walk_sessions(client, page_size=2)
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [sid for page in pages for sid in page] == live[::-1]
    assert walk_sessions(client, page_size=1) == [[sid] for sid in live[::-1]]
    assert walk_sessions(client, page_size=5) == [live[::-1]]
    filtered = walk_sessions(client, page_size=1, flow_id=population["a"], statuses=[RUNNING])
    assert filtered == [[live[4]], [live[0]]]


def test_list_sessions_paging_ignores_sessions_created_mid_walk(client, population):
    first = list_sessions(client, page_size=2)
    new_session(client, population["a"])  # newer than every page: belongs before page one
    rest = walk_sessions_from(client, first.next_page_token, page_size=2)
    seen = [s.session_id for s in first.sessions] + rest
    assert seen == population["live"][::-1]


def walk_sessions_from(client, token: str, **fields: Any) -> list[str]:
    seen = []
    while token:
        response = list_sessions(client, page_token=token, **fields)
        seen += [s.session_id for s in response.sessions]
        token = response.next_page_token
    return seen


def test_list_sessions_page_size_zero_is_the_default_of_50(client):
    flow_id = published_flow(client)
    created = [new_session(client, flow_id).session.session_id for _ in range(51)]
    first = list_sessions(client, page_size=0)
    assert [s.session_id for s in first.sessions] == created[::-1][:50]
    assert first.next_page_token
    second = list_sessions(client, page_token=first.next_page_token)
    assert [s.session_id for s in second.sessions] == [created[0]] and second.next_page_token == ""


def test_list_sessions_page_token_is_bound_to_the_filters(client, population):
    token = list_sessions(client, page_size=1).next_page_token
    assert token
    for other in (
        dict(environment="staging"),
        dict(flow_id=population["a"]),
        dict(statuses=[RUNNING]),
    ):
        request = spb.ListSessionsRequest(**{"environment": "live", "page_size": 1, "page_token": token, **other})
        fails(client.sessions.ListSessions, request, INVALID, "INVALID_PAGE_TOKEN", fields=("page_token",))
    filtered = list_sessions(client, page_size=1, statuses=[RUNNING, ABORTED]).next_page_token
    # The same filters (statuses in any order) accept it; others do not.
    assert list_sessions(client, page_size=1, statuses=[ABORTED, RUNNING], page_token=filtered).sessions
    fails(
        client.sessions.ListSessions,
        spb.ListSessionsRequest(environment="live", page_size=1, page_token=filtered),
        INVALID,
        "INVALID_PAGE_TOKEN",
    )
    flows_token = client.flows.ListFlows(fpb.ListFlowsRequest(page_size=1), timeout=TIMEOUT).next_page_token
    for bad in ("garbage", flows_token, token[:-2]):
        fails(
            client.sessions.ListSessions,
            spb.ListSessionsRequest(environment="live", page_token=bad),
            INVALID,
            "INVALID_PAGE_TOKEN",
            fields=("page_token",),
        )


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(page_size=-1), "page_size"),
        (dict(page_size=1001), "page_size"),
        (dict(statuses=[99]), "statuses[0]"),
        (dict(statuses=[RUNNING, 42]), "statuses[1]"),
        (dict(statuses=[session_pb2.SESSION_STATUS_UNSPECIFIED]), "statuses[0]"),
        (dict(environment="prod"), "environment"),
        (dict(environment=""), "environment"),
        (dict(flow_id="not a valid id"), "flow_id"),
    ],
    ids=["page-size-negative", "page-size-1001", "status-99", "status-42-second", "status-unspecified", "env-unknown", "env-empty", "flow-id-bad"],
)
def test_list_sessions_refuses_bad_requests(client, fields, field):
    request = spb.ListSessionsRequest(**{"environment": "live", **fields})
    fails(client.sessions.ListSessions, request, INVALID, fields=(field,))


def test_list_sessions_page_size_1000_is_allowed(client, population):
    assert len(list_sessions(client, page_size=1000).sessions) == 5


# ReportStepResult


def test_report_step_result_routes_to_the_next_step(client):
    flow_id = published_flow(client)
    s = new_session(client, flow_id).session
    moved = report(client, s.session_id, "document", "ok")
    assert (moved.status, moved.version) == (RUNNING, 2)
    assert (moved.current_step_id, moved.current_step_type) == ("liveness", "liveness")
    assert (moved.last_step.step_id, moved.last_step.step_type, moved.last_step.verdict) == ("document", "document_check", "ok")
    assert moved.last_step.HasField("report_time")
    assert moved.update_time.ToDatetime() >= s.update_time.ToDatetime()
    assert moved.create_time == s.create_time and moved.expire_time == s.expire_time
    assert not moved.HasField("end_time") and moved.outcome == UNSPECIFIED_OUTCOME
    again = report(client, s.session_id, "liveness", "retry")  # a self-loop
    assert (again.current_step_id, again.version, again.last_step.verdict) == ("liveness", 3, "retry")
    assert get(client, s.session_id) == again


@pytest.mark.parametrize(
    "path, outcome, version",
    [([("document", "ok"), ("liveness", "ok")], ACCEPTED, 3), ([("document", "bad")], REJECTED, 2), ([("document", "ok"), ("liveness", "bad")], REJECTED, 3)],
    ids=["accepted", "rejected-at-document", "rejected-at-liveness"],
)
def test_reaching_an_end_step_completes_with_its_outcome(client, path, outcome, version):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    for step_id, verdict in path:
        s = report(client, sid, step_id, verdict)
    assert (s.status, s.outcome, s.version) == (COMPLETED, outcome, version)
    assert s.current_step_id == ("accepted" if outcome == ACCEPTED else "rejected")
    assert s.current_step_type == "end"
    assert s.HasField("end_time") and s.end_time == s.update_time
    assert (s.last_step.step_id, s.last_step.verdict) == path[-1]
    assert not s.HasField("error") and s.abort_reason == ""
    assert get(client, sid) == s


def test_report_for_a_step_that_is_not_current_is_refused(client):
    flow_id = published_flow(client)
    before = new_session(client, flow_id).session
    sid = before.session_id
    for step_id in ("liveness", "accepted", "ghost"):
        err = fails(client.sessions.ReportStepResult, report_request(sid, step_id, "ok"), FAILED_PRECONDITION, "STEP_NOT_CURRENT")
        assert err.metadata["current_step_id"] == "document"
    assert get(client, sid) == before


def test_report_with_an_unknown_verdict_is_refused(client):
    flow_id = published_flow(client)
    before = new_session(client, flow_id).session
    sid = before.session_id
    fails(client.sessions.ReportStepResult, report_request(sid, "document", "maybe"), INVALID, "UNKNOWN_VERDICT", fields=("verdict",))
    fails(client.sessions.ReportStepResult, report_request(sid, "document", "retry"), INVALID, "UNKNOWN_VERDICT", fields=("verdict",))
    assert get(client, sid) == before


@pytest.mark.parametrize(
    "step_id, verdict, extra, field",
    [
        ("", "ok", {}, "step_id"),
        ("document", "", {}, "verdict"),
        ("document", "not ok", {}, "verdict"),
        ("document", "ok\n", {}, "verdict"),
        ("document\n", "ok", {}, "step_id"),
        ("document", "v" * 65, {}, "verdict"),
        ("s" * 65, "ok", {}, "step_id"),
        ("document", "ok", {"request_id": "r" * 129}, "request_id"),
        ("document", "ok", {"expected_version": -1}, "expected_version"),
        ("document", "ok", {"environment": "prod"}, "environment"),
        ("document", "ok", {"session_id": ""}, "session_id"),
    ],
    ids=["no-step", "no-verdict", "verdict-chars", "verdict-newline", "step-newline", "verdict-65", "step-65", "request-id-129", "expected-negative", "env", "no-session"],
)
def test_report_refuses_malformed_requests(client, step_id, verdict, extra, field):
    flow_id = published_flow(client)
    before = new_session(client, flow_id).session
    fields = {"environment": "live", "session_id": before.session_id, "step_id": step_id, "verdict": verdict, **extra}
    fails(client.sessions.ReportStepResult, spb.ReportStepResultRequest(**fields), INVALID, fields=(field,))
    assert get(client, before.session_id) == before


def test_report_with_expected_version(client):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    moved = report(client, sid, "document", "ok", expected_version=1)
    assert moved.version == 2
    err = fails(
        client.sessions.ReportStepResult,
        report_request(sid, "liveness", "ok", expected_version=1),
        ABORTED_CODE,
        "VERSION_MISMATCH",
    )
    assert err.metadata["version"] == "2"
    fails(client.sessions.ReportStepResult, report_request(sid, "liveness", "ok", expected_version=3), ABORTED_CODE, "VERSION_MISMATCH")
    assert get(client, sid) == moved
    assert report(client, sid, "liveness", "ok", expected_version=2).status == COMPLETED


def test_report_retry_with_the_same_request_id_returns_the_first_answer(client):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    first = report(client, sid, "document", "ok", request_id="r1")
    assert first.version == 2
    retry = report(client, sid, "document", "ok", request_id="r1")
    assert retry == first
    assert get(client, sid).version == 2  # not advanced twice
    # A later change, then the retry again: still the first answer, and nothing moves.
    done = report(client, sid, "liveness", "ok", request_id="r2")
    assert (done.status, done.version) == (COMPLETED, 3)
    late = report(client, sid, "document", "ok", request_id="r1")
    assert late == first
    assert (late.version, late.current_step_id, late.status) == (2, "liveness", RUNNING)
    # The retry of the completing report answers as it did, not SESSION_TERMINAL.
    assert report(client, sid, "liveness", "ok", request_id="r2") == done
    assert get(client, sid) == done


def test_report_retry_of_a_self_loop_does_not_loop_twice(client):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    report(client, sid, "document", "ok")
    first = report(client, sid, "liveness", "retry", request_id="loop-1")
    assert first.version == 3
    for _ in range(3):
        assert report(client, sid, "liveness", "retry", request_id="loop-1") == first
    assert get(client, sid).version == 3


def test_report_same_request_id_with_another_verdict_is_already_exists(client):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    first = report(client, sid, "document", "ok", request_id="r1")
    fails(client.sessions.ReportStepResult, report_request(sid, "document", "bad", request_id="r1"), ALREADY_EXISTS, "REQUEST_ID_REUSED")
    fails(client.sessions.ReportStepResult, report_request(sid, "liveness", "ok", request_id="r1"), ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert get(client, sid) == first


def test_report_request_ids_are_per_session(client):
    flow_id = published_flow(client)
    a = new_session(client, flow_id).session.session_id
    b = new_session(client, flow_id).session.session_id
    assert report(client, a, "document", "ok", request_id="step-1").session_id == a
    moved = report(client, b, "document", "ok", request_id="step-1")
    assert (moved.session_id, moved.version, moved.current_step_id) == (b, 2, "liveness")


def test_a_refused_report_is_not_remembered_under_its_request_id(client):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    fails(client.sessions.ReportStepResult, report_request(sid, "liveness", "ok", request_id="r1"), FAILED_PRECONDITION, "STEP_NOT_CURRENT")
    fails(client.sessions.ReportStepResult, report_request(sid, "document", "maybe", request_id="r2"), INVALID, "UNKNOWN_VERDICT")
    assert get(client, sid).version == 1
    # A corrected retry under the same id is a new request that now applies.
    assert report(client, sid, "document", "ok", request_id="r2").version == 2


# AbortSession


def test_abort_session(client):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    report(client, sid, "document", "ok")
    s = abort(client, sid, reason="user closed the tab")
    assert (s.status, s.version, s.abort_reason) == (ABORTED, 3, "user closed the tab")
    assert s.outcome == UNSPECIFIED_OUTCOME and not s.HasField("error")
    assert s.HasField("end_time") and s.end_time == s.update_time
    assert s.current_step_id == "liveness"  # the step it stopped on
    assert get(client, sid) == s


def test_abort_session_accepts_a_reason_of_1024_characters(client):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    assert abort(client, sid, reason="r" * 1024).abort_reason == "r" * 1024


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(reason=""), "reason"),
        (dict(reason="r" * 1025), "reason"),
        (dict(reason="ok", expected_version=-1), "expected_version"),
        (dict(reason="ok", environment="prod"), "environment"),
        (dict(reason="ok", session_id=""), "session_id"),
    ],
    ids=["no-reason", "reason-1025", "expected-negative", "env", "no-session"],
)
def test_abort_session_refuses_malformed_requests(client, fields, field):
    flow_id = published_flow(client)
    before = new_session(client, flow_id).session
    request = spb.AbortSessionRequest(**{"environment": "live", "session_id": before.session_id, **fields})
    fails(client.sessions.AbortSession, request, INVALID, fields=(field,))
    assert get(client, before.session_id) == before


def test_abort_session_with_expected_version(client):
    flow_id = published_flow(client)
    before = new_session(client, flow_id).session
    sid = before.session_id
    fails(
        client.sessions.AbortSession,
        spb.AbortSessionRequest(environment="live", session_id=sid, reason="r", expected_version=2),
        ABORTED_CODE,
        "VERSION_MISMATCH",
    )
    assert get(client, sid) == before
    assert abort(client, sid, expected_version=1).status == ABORTED


# FailSession


def test_fail_session_records_a_technical_error(client):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    report(client, sid, "document", "ok")
    s = fail(client, sid, error_code="liveness.provider_timeout", error_message="vendor answered 504", step_id="liveness")
    assert (s.status, s.version) == (ERROR, 3)
    assert (s.error.code, s.error.message, s.error.step_id) == ("liveness.provider_timeout", "vendor answered 504", "liveness")
    assert s.outcome == UNSPECIFIED_OUTCOME  # never a business decision
    assert s.HasField("end_time") and s.end_time == s.update_time and s.abort_reason == ""
    assert get(client, sid) == s


def test_fail_session_without_a_step(client):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    s = fail(client, sid, error_code="E1")
    assert (s.status, s.error.code, s.error.message, s.error.step_id) == (ERROR, "E1", "", "")
    assert s.outcome == UNSPECIFIED_OUTCOME


def test_fail_session_accepts_values_on_the_limits(client):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    s = fail(client, sid, error_code="c" * 128, error_message="m" * 2048)
    assert (s.error.code, s.error.message) == ("c" * 128, "m" * 2048)


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(error_code=""), "error_code"),
        (dict(error_code="c" * 129), "error_code"),
        (dict(error_code="E", error_message="m" * 2049), "error_message"),
        (dict(error_code="E", step_id="bad step"), "step_id"),
        (dict(error_code="E", expected_version=-1), "expected_version"),
        (dict(error_code="E", environment="prod"), "environment"),
        (dict(error_code="E", session_id=""), "session_id"),
    ],
    ids=["no-code", "code-129", "message-2049", "step-chars", "expected-negative", "env", "no-session"],
)
def test_fail_session_refuses_malformed_requests(client, fields, field):
    flow_id = published_flow(client)
    before = new_session(client, flow_id).session
    request = spb.FailSessionRequest(**{"environment": "live", "session_id": before.session_id, **fields})
    fails(client.sessions.FailSession, request, INVALID, fields=(field,))
    assert get(client, before.session_id) == before


def test_fail_session_on_a_step_that_is_not_current_is_refused(client):
    flow_id = published_flow(client)
    before = new_session(client, flow_id).session
    sid = before.session_id
    for step_id in ("liveness", "ghost"):
        fails(
            client.sessions.FailSession,
            spb.FailSessionRequest(environment="live", session_id=sid, error_code="E", step_id=step_id),
            FAILED_PRECONDITION,
            "STEP_NOT_CURRENT",
        )
    assert get(client, sid) == before


def test_fail_session_with_expected_version(client):
    flow_id = published_flow(client)
    before = new_session(client, flow_id).session
    sid = before.session_id
    fails(
        client.sessions.FailSession,
        spb.FailSessionRequest(environment="live", session_id=sid, error_code="E", expected_version=7),
        ABORTED_CODE,
        "VERSION_MISMATCH",
    )
    assert get(client, sid) == before
    assert fail(client, sid, expected_version=1).status == ERROR


# Terminal sessions: every verb on every terminal status is refused and writes nothing.


def _to_terminal(client, clock: FakeClock, status: int) -> str:
    flow_id = published_flow(client, timeout_s=60)
    sid = new_session(client, flow_id).session.session_id
    report(client, sid, "document", "ok")  # on "liveness", version 2
    if status == COMPLETED:
        report(client, sid, "liveness", "ok")
    elif status == ABORTED:
        abort(client, sid)
    elif status == ERROR:
        fail(client, sid, step_id="liveness")
    elif status == EXPIRED:
        clock.advance(timedelta(seconds=61))
    s = get(client, sid)
    assert (s.status, s.version) == (status, 3)
    return sid


VERBS: dict[str, Callable[[str], tuple[str, Any]]] = {
    # What a RUNNING session at "liveness" would accept: only the terminal status stops it.
    "report": lambda sid: ("ReportStepResult", report_request(sid, "liveness", "ok")),
    "report-with-request-id": lambda sid: ("ReportStepResult", report_request(sid, "liveness", "ok", request_id="fresh")),
    "report-with-expected-version": lambda sid: ("ReportStepResult", report_request(sid, "liveness", "ok", expected_version=3)),
    "report-end-step": lambda sid: ("ReportStepResult", report_request(sid, "accepted", "ok")),
    "abort": lambda sid: ("AbortSession", spb.AbortSessionRequest(environment="live", session_id=sid, reason="again")),
    "abort-with-expected-version": lambda sid: (
        "AbortSession",
        spb.AbortSessionRequest(environment="live", session_id=sid, reason="again", expected_version=3),
    ),
    "fail": lambda sid: ("FailSession", spb.FailSessionRequest(environment="live", session_id=sid, error_code="E")),
    "fail-with-step": lambda sid: (
        "FailSession",
        spb.FailSessionRequest(environment="live", session_id=sid, error_code="E", step_id="liveness"),
    ),
}
TERMINAL = {"completed": COMPLETED, "aborted": ABORTED, "error": ERROR, "expired": EXPIRED}


@pytest.mark.parametrize("verb", list(VERBS))
@pytest.mark.parametrize("status", list(TERMINAL))
def test_every_verb_on_a_terminal_session_is_refused_and_writes_nothing(clocked, status, verb):
    client, clock = clocked
    sid = _to_terminal(client, clock, TERMINAL[status])
    before = get(client, sid)
    method, request = VERBS[verb](sid)
    fails(getattr(client.sessions, method), request, FAILED_PRECONDITION, "SESSION_TERMINAL")
    # Twice: a refusal is not remembered, and never turns into something else.
    fails(getattr(client.sessions, method), request, FAILED_PRECONDITION, "SESSION_TERMINAL")
    after = get(client, sid)
    assert after == before
    assert (after.status, after.version) == (TERMINAL[status], 3)
    (listed,) = list_sessions(client).sessions
    assert listed == before


def test_list_sessions_paging_is_exact_when_sessions_share_a_create_time(clocked):
    client, _clock = clocked  # the clock never moves: every session has the same create_time
    flow_id = published_flow(client)
    created = {new_session(client, flow_id).session.session_id for _ in range(7)}
    pages = walk_sessions(client, page_size=2)
    seen = [sid for page in pages for sid in page]
    assert [len(p) for p in pages] == [2, 2, 2, 1]
    assert sorted(seen) == sorted(created) and len(seen) == len(set(seen))
    assert seen == [s.session_id for s in list_sessions(client).sessions]
