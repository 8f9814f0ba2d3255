"""Typed domain errors. ``api/errors.py`` is the only place that maps them to gRPC status codes."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """Base class. ``reason`` is an UPPER_SNAKE ErrorInfo reason; ``metadata`` goes into ErrorInfo."""

    default_reason = "ERROR"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})


class InvalidArgument(DomainError):
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        *,
        violations: list[FieldViolation] | None = None,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
    ):
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = list(violations or [])

    @classmethod
    def of(cls, violations: list[FieldViolation], *, reason: str | None = None) -> InvalidArgument:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        return cls(f"invalid request: {summary}", violations=violations, reason=reason)


class NotFound(DomainError):
    default_reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    default_reason = "FAILED_PRECONDITION"


class VersionMismatch(DomainError):
    """The caller's expected_version (an etag) is not the session's version."""

    default_reason = "VERSION_MISMATCH"


class OutOfRange(DomainError):
    default_reason = "OUT_OF_RANGE"


class ResourceExhausted(DomainError):
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class Unavailable(DomainError):
    default_reason = "UNAVAILABLE"

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after

    @classmethod
    def shutting_down(cls, what_to_do: str = "retry on another server or shortly") -> Unavailable:
        """What every call and stream the stopping server refuses or ends gets."""
        return cls(f"the server is shutting down; {what_to_do}", reason="SHUTTING_DOWN", retry_after=1.0)


@dataclass
class Violations:
    """Collects every field violation of a request so the caller learns all of them at once."""

    items: list[FieldViolation] = field(default_factory=list)

    def add(self, field_path: str, description: str) -> None:
        self.items.append(FieldViolation(field_path, description))

    def raise_if_any(self, reason: str | None = None) -> None:
        if self.items:
            raise InvalidArgument.of(self.items, reason=reason)
