"""The one table from domain errors to gRPC status codes, with google.rpc rich details.

Every error carries ErrorInfo (reason, domain "flowsession", metadata); validation errors add BadRequest
field violations; retryable ones add RetryInfo. Anything unexpected becomes INTERNAL with a generic
message (the traceback is logged), never UNKNOWN.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2, message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..domain import errors as d

log = logging.getLogger(__name__)

DOMAIN = "flowsession"

CODES: dict[type[d.DomainError], grpc.StatusCode] = {
    d.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    d.NotFound: grpc.StatusCode.NOT_FOUND,
    d.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    d.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    d.VersionMismatch: grpc.StatusCode.ABORTED,
    d.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    d.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    d.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


# The status travels in the trailers, and grpc clients refuse trailers over 8 KiB by default (the
# call then fails with RESOURCE_EXHAUSTED instead of the error). Echoed input and a graph with hundreds
# of faults must not get there: the message and the violations are cut to these sizes (UTF-8 bytes),
# and ErrorInfo says how many violations were left out. grpc-message percent-encodes non-ASCII (3x) and
# the details are base64 (4/3x), so the worst case stays near 6 KiB.
MAX_MESSAGE_BYTES = 512
MAX_VIOLATIONS_BYTES = 3_000
MAX_FIELD_BYTES = 160
MAX_DESCRIPTION_BYTES = 320
MAX_METADATA_VALUE_BYTES = 256


def clip(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8, ending in an ellipsis when cut."""
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    return data[: max_bytes - 3].decode(errors="ignore") + "\u2026"


def _violations(error: d.InvalidArgument) -> tuple[list[error_details_pb2.BadRequest.FieldViolation], int]:
    kept, size = [], 0
    for v in error.violations:
        item = error_details_pb2.BadRequest.FieldViolation(
            field=clip(v.field, MAX_FIELD_BYTES), description=clip(v.description, MAX_DESCRIPTION_BYTES)
        )
        size += item.ByteSize() + 3  # + the field's tag and length
        if size > MAX_VIOLATIONS_BYTES:
            break
        kept.append(item)
    return kept, len(error.violations) - len(kept) + error.omitted


def status_for(error: d.DomainError) -> grpc.Status:
    code = next((c for cls, c in CODES.items() if isinstance(error, cls)), grpc.StatusCode.INTERNAL)
    metadata = {k: clip(value, MAX_METADATA_VALUE_BYTES) for k, value in error.metadata.items()}
    violations, omitted = _violations(error) if isinstance(error, d.InvalidArgument) else ([], 0)
    if omitted:
        metadata["omitted_violations"] = str(omitted)
    details = [_packed(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata))]
    if violations:
        details.append(_packed(error_details_pb2.BadRequest(field_violations=violations)))
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(retry_after * 1000))
        details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    message = clip(error.message, MAX_MESSAGE_BYTES)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=details))


def internal_status() -> grpc.Status:
    info = _packed(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN))
    return rpc_status.to_status(
        status_pb2.Status(code=code_pb2.INTERNAL, message="internal error; the server logged the details", details=[info])
    )


@dataclass(frozen=True)
class Undecodable:
    """What the request deserializer yields for bytes that are no valid message. An exception raised in
    a deserializer reaches the client as UNKNOWN without details; this reaches the handler instead."""

    problem: str

    def error(self) -> d.InvalidArgument:
        return d.InvalidArgument(f"the request could not be decoded: {self.problem}", reason="MALFORMED_REQUEST")


async def refuse_undecodable(request: Any, context: grpc.aio.ServicerContext) -> None:
    """Ends the call with INVALID_ARGUMENT / MALFORMED_REQUEST if ``request`` could not be decoded: for
    the servicers that are not ``unary``'s (health, reflection)."""
    if isinstance(request, Undecodable):
        await context.abort_with_status(status_for(request.error()))


def _lenient(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except message.DecodeError as exc:  # invalid UTF-8, nesting beyond protobuf's limit, garbage
            return Undecodable(str(exc))

    return parse


class _Captured:
    """Stands in for the server while a generated ``add_…Servicer_to_server`` registers its handlers."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # rebuilt from the registered method handlers below

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.services[service] = handlers


def _bytes_as_they_are(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    def serialize_unless_bytes(response: Any) -> bytes:
        return response if type(response) is bytes else serialize(response)

    return serialize_unless_bytes


def add_servicer(add_to_server: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server) -> None:
    """Registers ``servicer`` through its generated ``add_to_server``. Request deserializers hand
    undecodable bytes to the handler as an ``Undecodable`` (which ``unary`` below, and health and
    reflection, answer with INVALID_ARGUMENT; a deserializer's own exception reached the client as
    UNKNOWN, with a traceback logged per call), and a streaming method may write a response already
    serialized, as bytes: one event fans out to many watch streams, serialized once.

    As generic handlers only, never as registered methods (which the generated code asks for): the aio
    server keeps one request for a call pending in gRPC core per registered method, and when it stops,
    it cancels those of its requests whose answer has not yet reached the event loop. A call core had
    just matched to one of them then never reaches Python, and core holds it until the whole grace has
    passed and then cancels it ("Cancelling all calls"). With generic handlers alone, one request is
    pending at a time and the serving loop always takes its answer before it stops."""
    captured = _Captured()
    add_to_server(servicer, captured)
    assert captured.services, "the generated code registered no method handlers"
    for service, handlers in captured.services.items():
        handlers = {
            name: handler._replace(  # type: ignore[attr-defined]
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=_bytes_as_they_are(handler.response_serializer)
                if handler.response_streaming
                else handler.response_serializer,
            )
            for name, handler in handlers.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


class Admission:
    """Whether the servicers take new calls. At shutdown gRPC core cancels every call it holds that the
    aio server has not yet picked up, with a bare CANCELLED that no client knows to retry; under load that
    was most of the calls in flight. So a stopping server first drains: it answers every call it picks up
    UNAVAILABLE / SHUTTING_DOWN (nothing done, retry elsewhere) until none has come for a while, and only
    then lets gRPC stop (its GOAWAY then tells clients to send no more). Every servicer method checks it
    (``unary`` does)."""

    def __init__(self) -> None:
        self.open = True
        self._last_call = 0.0

    def check(self) -> None:
        self._last_call = time.monotonic()
        if not self.open:
            raise d.Unavailable.shutting_down()

    def close(self) -> None:
        self.open = False

    async def drain(self, *, quiet: float, limit: float) -> float:
        """Closes, then returns once no call has come for ``quiet`` seconds of an event loop that kept up
        (a busy loop picks up no waiting call, so its silence proves nothing), or after ``limit``.
        Calls already running go on. Returns the seconds it took."""
        self.close()
        start = time.monotonic()
        calm_since = start
        while True:
            now = time.monotonic()
            due = min(max(calm_since, self._last_call) + quiet, start + limit)
            if now >= due:
                return now - start
            await asyncio.sleep(due - now)
            woke = time.monotonic()
            if woke - due > quiet / 5:
                calm_since = woke


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def unary(fn: Handler) -> Handler:
    """Wraps a unary servicer method: domain errors -> their status; anything else -> INTERNAL."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            self._admission.check()
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except d.DomainError as error:
            status = status_for(error)
        except Exception:
            log.exception("unexpected error in %s", fn.__qualname__)
            status = internal_status()
        set_status(context, status)
        return None

    return wrapper  # type: ignore[return-value]


def set_status(context: grpc.aio.ServicerContext, status: grpc.Status) -> None:
    """Ends the call with ``status`` once the handler returns (grpc drops a unary response then).
    Not abort_with_status: its AbortError, kept by the call's state, and the traceback's frames,
    holding the context, form a cycle per failed call that only a full collection frees (tens of
    MB of garbage between them, then a pause of seconds, under a stream of refused calls)."""
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)
