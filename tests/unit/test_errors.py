"""api/errors.py: the status every domain error becomes stays within the trailers' size limits."""
from __future__ import annotations

import asyncio
import logging
import time

import pytest
from google.rpc import error_details_pb2, status_pb2
from flowsession_server.api import errors, streams
from flowsession_server.domain.errors import MAX_VIOLATIONS, FieldViolation, InvalidArgument, NotFound, Unavailable, Violations


@pytest.mark.parametrize("text", ["é" * 400, "€" * 300, "x" * 1000, "a€" * 200])
def test_clip_cuts_to_whole_characters_within_the_byte_budget(text):
    cut = errors.clip(text, 512)
    assert len(cut.encode()) <= 512
    assert cut.endswith("\u2026") and text.startswith(cut[:-1])


def test_clip_leaves_short_text_alone():
    assert errors.clip("é" * 256, 512) == "é" * 256


def test_violations_beyond_those_an_error_can_carry_are_only_counted():
    # A request of a million bad values built a million violations (and a message joining them all)
    # for an error that carries a few dozen: seconds of the event loop.
    v = Violations()
    for i in range(10 * MAX_VIOLATIONS):
        v.add(f"statuses[{i}]", "not a session status")
    assert len(v.items) == MAX_VIOLATIONS and v.full and v.omitted == 9 * MAX_VIOLATIONS
    with pytest.raises(InvalidArgument) as raised:
        v.raise_if_any()
    status = status_pb2.Status.FromString(dict(errors.status_for(raised.value).trailing_metadata)["grpc-status-details-bin"])
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    status.details[0].Unpack(info)
    status.details[1].Unpack(bad)
    assert len(bad.field_violations) + int(info.metadata["omitted_violations"]) == 10 * MAX_VIOLATIONS


def test_status_of_a_huge_error_fits_grpcs_default_8_kib_trailers():
    huge = "\u20ac" * 5000  # percent-encoded, each of these is 9 bytes in grpc-message
    violations = [FieldViolation(f"steps[{i}].routes['{huge}']", huge) for i in range(500)]
    status = errors.status_for(InvalidArgument.of(violations))
    trailers = dict(status.trailing_metadata)
    size = sum(len(k) + len(v) for k, v in trailers.items()) + len(status.details.encode()) * 3
    assert size < 8 * 1024, size


def test_status_keeps_every_detail_of_an_ordinary_error():
    error = NotFound("session s not found", reason="SESSION_NOT_FOUND", metadata={"session_id": "s"})
    status = errors.status_for(error)
    assert status.details == "session s not found"
    (packed,) = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"]).details
    info = error_details_pb2.ErrorInfo()
    assert packed.Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == ("SESSION_NOT_FOUND", "flowsession", {"session_id": "s"})


def _busy(seconds: float) -> float:
    """Keeps the event loop from running anything else, as thousands of streams ending at once do."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return end


def test_a_drain_refuses_calls_and_waits_a_full_quiet_period_after_the_last_one():
    async def body() -> None:
        admission = errors.Admission()
        admission.check()  # open: taken
        draining = asyncio.ensure_future(admission.drain(quiet=0.05, limit=5))
        await asyncio.sleep(0)  # the drain has started
        with pytest.raises(Unavailable) as info:
            admission.check()
        assert info.value.reason == "SHUTTING_DOWN" and info.value.retry_after
        last_call = time.monotonic()
        await draining
        assert time.monotonic() - last_call >= 0.05

    asyncio.run(body())


def test_a_drain_does_not_count_time_the_event_loop_spent_busy_as_quiet():
    async def body() -> None:
        admission = errors.Admission()
        draining = asyncio.ensure_future(admission.drain(quiet=0.05, limit=5))
        await asyncio.sleep(0)
        free_again = _busy(0.2)  # no waiting call could be picked up meanwhile
        await draining
        assert time.monotonic() - free_again >= 0.05

    asyncio.run(body())


def test_a_drain_ends_at_its_limit_however_busy():
    async def body() -> None:
        admission = errors.Admission()
        draining = asyncio.ensure_future(admission.drain(quiet=10, limit=0.05))
        assert await asyncio.wait_for(draining, 5) >= 0.05

    asyncio.run(body())


def _grpc_record(message: str) -> logging.LogRecord:
    return logging.LogRecord(streams.GRPC_AIO_LOGGER, logging.ERROR, __file__, 1, message, None, None)


@pytest.mark.parametrize("method", streams.WATCH_METHODS)
def test_a_watch_streams_final_status_failing_is_no_error(method):
    record = _grpc_record(f"ExecuteBatchError raised in core by servicer method [{method}]")
    assert not streams.CLIENT_GONE_FILTER.filter(record)


@pytest.mark.parametrize(
    "message",
    [
        "ExecuteBatchError raised in core by servicer method [/flowsession.v1.SessionService/ReportStepResult]",
        "Unexpected [ValueError] raised by servicer method [/flowsession.v1.SessionService/WatchSession]",
    ],
)
def test_other_grpc_errors_are_still_logged(message):
    # A unary call's status, or anything but a failed batch, can be a real fault: left to grpc's log.
    assert streams.CLIENT_GONE_FILTER.filter(_grpc_record(message))
