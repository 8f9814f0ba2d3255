"""The one table from domain errors to gRPC status codes, with google.rpc rich details.

Every error carries ErrorInfo (reason, domain "flowsession", metadata); validation errors add BadRequest
field violations; retryable ones add RetryInfo. Anything unexpected becomes INTERNAL with a generic
message (the traceback is logged), never UNKNOWN.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Awaitable, Callable, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
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


def status_for(error: d.DomainError) -> grpc.Status:
    code = next((c for cls, c in CODES.items() if isinstance(error, cls)), grpc.StatusCode.INTERNAL)
    details = [_packed(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata))]
    if isinstance(error, d.InvalidArgument) and error.violations:
        details.append(
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                        for v in error.violations
                    ]
                )
            )
        )
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(retry_after * 1000))
        details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=error.message, details=details))


def internal_status() -> grpc.Status:
    info = _packed(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN))
    return rpc_status.to_status(
        status_pb2.Status(code=code_pb2.INTERNAL, message="internal error; the server logged the details", details=[info])
    )


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def unary(fn: Handler) -> Handler:
    """Wraps a unary servicer method: domain errors -> their status; anything else -> INTERNAL."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except d.DomainError as error:
            await context.abort_with_status(status_for(error))
        except Exception:
            log.exception("unexpected error in %s", fn.__qualname__)
            await context.abort_with_status(internal_status())

    return wrapper  # type: ignore[return-value]
