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
        omitted: int = 0,
    ):
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = list(violations or [])
        self.omitted = omitted  # violations found beyond ``violations``, only counted

    @classmethod
    def of(cls, violations: list[FieldViolation], *, reason: str | None = None, omitted: int = 0) -> InvalidArgument:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        return cls(f"invalid request: {summary}", violations=violations, reason=reason, omitted=omitted)


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


# Violations kept per request, more than fit in an error's details (api/errors.py); the rest are only
# counted: building and joining a million of them (a 1 MB request of bad values) held the event loop,
# and every other call, for two seconds.
MAX_VIOLATIONS = 100


@dataclass
class Violations:
    """Collects every field violation of a request so the caller learns all of them at once (the first
    MAX_VIOLATIONS, and how many more)."""

    items: list[FieldViolation] = field(default_factory=list)
    omitted: int = 0

    def add(self, field_path: str, description: str) -> None:
        if len(self.items) < MAX_VIOLATIONS:
            self.items.append(FieldViolation(field_path, description))
        else:
            self.omitted += 1

    @property
    def full(self) -> bool:
        """True once further violations are only counted: a loop over many values may stop describing
        them and ``omit`` the rest."""
        return len(self.items) >= MAX_VIOLATIONS

    def omit(self, count: int) -> None:
        """Counts ``count`` violations that were found but not described."""
        self.omitted += count

    def raise_if_any(self, reason: str | None = None) -> None:
        if self.items:
            raise InvalidArgument.of(self.items, reason=reason, omitted=self.omitted)
