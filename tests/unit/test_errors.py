"""api/errors.py: the status every domain error becomes stays within the trailers' size limits."""
from __future__ import annotations

import pytest
from google.rpc import error_details_pb2, status_pb2
from flowsession_server.api import errors
from flowsession_server.domain.errors import FieldViolation, InvalidArgument, NotFound


@pytest.mark.parametrize("text", ["é" * 400, "€" * 300, "x" * 1000, "a€" * 200])
def test_clip_cuts_to_whole_characters_within_the_byte_budget(text):
    cut = errors.clip(text, 512)
    assert len(cut.encode()) <= 512
    assert cut.endswith("\u2026") and text.startswith(cut[:-1])


def test_clip_leaves_short_text_alone():
    assert errors.clip("é" * 256, 512) == "é" * 256


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
