"""Domain dataclasses and enums. Times are timezone-aware UTC datetimes."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Mapping


class SessionStatus(enum.Enum):
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    ABORTED = "ABORTED"
    EXPIRED = "EXPIRED"
    ERROR = "ERROR"

    @property
    def terminal(self) -> bool:
        return self is not SessionStatus.RUNNING


class SessionOutcome(enum.Enum):
    UNSPECIFIED = "UNSPECIFIED"
    ACCEPTED = "ACCEPTED"
    REJECTED = "REJECTED"


class FlowVersionState(enum.Enum):
    DRAFT = "DRAFT"
    PUBLISHED = "PUBLISHED"


class EventType(enum.Enum):
    CREATED = "CREATED"
    STEP_COMPLETED = "STEP_COMPLETED"
    COMPLETED = "COMPLETED"
    ABORTED = "ABORTED"
    EXPIRED = "EXPIRED"
    ERROR = "ERROR"


@dataclass(frozen=True)
class Step:
    step_id: str
    step_type: str
    routes: Mapping[str, str] = field(default_factory=dict)
    outcome: SessionOutcome = SessionOutcome.UNSPECIFIED

    @property
    def is_end(self) -> bool:
        return self.outcome is not SessionOutcome.UNSPECIFIED


@dataclass(frozen=True)
class FlowGraph:
    start_step_id: str
    steps: tuple[Step, ...]

    def step(self, step_id: str) -> Step | None:
        for step in self.steps:
            if step.step_id == step_id:
                return step
        return None


DEFAULT_EXECUTION_TIMEOUT = timedelta(hours=24)
MIN_EXECUTION_TIMEOUT = timedelta(seconds=1)
MAX_EXECUTION_TIMEOUT = timedelta(days=30)


@dataclass(frozen=True)
class Flow:
    flow_id: str
    name: str
    description: str
    create_time: datetime
    update_time: datetime
    latest_version: int = 0
    # environment -> version that new sessions of that environment run
    published_versions: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FlowVersion:
    flow_id: str
    version: int
    state: FlowVersionState
    graph: FlowGraph
    execution_timeout: timedelta
    create_time: datetime
    update_time: datetime
    publish_time: datetime | None = None
    environments: tuple[str, ...] = ()


@dataclass(frozen=True)
class StepResult:
    step_id: str
    step_type: str
    verdict: str
    report_time: datetime


@dataclass(frozen=True)
class SessionError:
    code: str
    message: str
    step_id: str = ""


@dataclass(frozen=True)
class Session:
    session_id: str
    flow_id: str
    flow_version: int
    environment: str
    status: SessionStatus
    current_step_id: str
    current_step_type: str
    create_time: datetime
    update_time: datetime
    expire_time: datetime
    version: int
    outcome: SessionOutcome = SessionOutcome.UNSPECIFIED
    last_step: StepResult | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    redirect_url: str = ""
    state: str = ""
    input: Mapping[str, Any] = field(default_factory=dict)
    end_time: datetime | None = None
    error: SessionError | None = None
    abort_reason: str = ""


@dataclass(frozen=True)
class LogPosition:
    """A place in the global event log: just after the event at ``cursor`` (0: the start). ``tag``
    identifies that event (empty at the start, or where the event is unknown), so a position is told
    apart from the same cursor in a database restored from an older copy, whose log went on differently."""

    cursor: int
    tag: str = ""


START = LogPosition(0)


@dataclass(frozen=True)
class SessionEvent:
    """One committed change: the session as it stood after it. ``cursor`` is the global log position;
    ``tag`` identifies the event at it (see LogPosition); the store sets both."""

    session_id: str
    version: int
    type: EventType
    event_time: datetime
    session: Session
    cursor: int = 0
    tag: str = ""

    @property
    def position(self) -> LogPosition:
        return LogPosition(self.cursor, self.tag)

    @property
    def terminal(self) -> bool:
        return self.session.status.terminal
