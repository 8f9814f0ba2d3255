"""Proto <-> domain conversion. No rules here: only shapes."""
from __future__ import annotations

import re
from collections import OrderedDict
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from flowsession.v1 import flow_pb2, session_pb2

from ..domain.errors import Violations
from ..store.codec import to_us
from ..domain.model import (
    DEFAULT_EXECUTION_TIMEOUT,
    MAX_EXECUTION_TIMEOUT,
    MIN_EXECUTION_TIMEOUT,
    EventType,
    Flow,
    FlowGraph,
    FlowVersion,
    FlowVersionState,
    LogPosition,
    Session,
    SessionEvent,
    SessionOutcome,
    SessionStatus,
    Step,
)

T = TypeVar("T")

_OUTCOME_TO_PB = {
    SessionOutcome.UNSPECIFIED: flow_pb2.SESSION_OUTCOME_UNSPECIFIED,
    SessionOutcome.ACCEPTED: flow_pb2.SESSION_OUTCOME_ACCEPTED,
    SessionOutcome.REJECTED: flow_pb2.SESSION_OUTCOME_REJECTED,
}
_OUTCOME_FROM_PB = {v: k for k, v in _OUTCOME_TO_PB.items()}
STATUS_TO_PB = {s: session_pb2.SessionStatus.Value(f"SESSION_STATUS_{s.value}") for s in SessionStatus}
STATUS_FROM_PB = {v: k for k, v in STATUS_TO_PB.items()}
_EVENT_TO_PB = {e: session_pb2.SessionEventType.Value(f"SESSION_EVENT_TYPE_{e.value}") for e in EventType}
_STATE_TO_PB = {
    FlowVersionState.DRAFT: flow_pb2.FLOW_VERSION_STATE_DRAFT,
    FlowVersionState.PUBLISHED: flow_pb2.FLOW_VERSION_STATE_PUBLISHED,
}


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    _set_time(ts, value)
    return ts


def _set_time(target: timestamp_pb2.Timestamp, value: datetime) -> None:
    # Integer arithmetic on microseconds: Timestamp.FromDatetime was a tenth of a status change's CPU.
    us = to_us(value)
    target.seconds = us // 1_000_000
    target.nanos = us % 1_000_000 * 1000


def duration(value: timedelta) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(value)
    return d


def outcome_from_pb(value: int) -> SessionOutcome | None:
    """None for a number this server does not know (a newer client's enum value)."""
    return _OUTCOME_FROM_PB.get(value)


def execution_timeout(v: Violations, request: Any) -> timedelta:
    """Checked on the exact Duration, before conversion can overflow or round it."""
    if not request.HasField("execution_timeout"):
        return DEFAULT_EXECUTION_TIMEOUT
    d = request.execution_timeout
    total_ns = d.seconds * 1_000_000_000 + d.nanos
    low, high = (int(t / timedelta(microseconds=1)) * 1000 for t in (MIN_EXECUTION_TIMEOUT, MAX_EXECUTION_TIMEOUT))
    if not -999_999_999 <= d.nanos <= 999_999_999 or (d.seconds > 0 > d.nanos) or (d.seconds < 0 < d.nanos):
        # Not a Duration (nanos beyond a second, or of the other sign): refused, not silently renormalised.
        v.add("execution_timeout", "is not a valid Duration: nanos must be within ±999,999,999 and of the seconds' sign")
    elif not low <= total_ns <= high:
        v.add("execution_timeout", "must be between 1 second and 30 days")
    elif d.nanos % 1000:
        v.add("execution_timeout", "must be a whole number of microseconds")
    else:
        return d.ToTimedelta()
    return DEFAULT_EXECUTION_TIMEOUT


def graph_from_pb(start_step_id: str, steps: Any) -> FlowGraph:
    return FlowGraph(
        start_step_id,
        tuple(
            Step(s.step_id, s.step_type, dict(s.routes), _OUTCOME_FROM_PB.get(s.outcome, SessionOutcome.UNSPECIFIED))
            for s in steps
        ),
    )


def flow_pb(flow: Flow) -> flow_pb2.Flow:
    return flow_pb2.Flow(
        flow_id=flow.flow_id,
        name=flow.name,
        description=flow.description,
        create_time=timestamp(flow.create_time),
        update_time=timestamp(flow.update_time),
        published_versions=dict(flow.published_versions),
        latest_version=flow.latest_version,
    )


def flow_version_pb(fv: FlowVersion) -> flow_pb2.FlowVersion:
    pb = flow_pb2.FlowVersion(
        flow_id=fv.flow_id,
        version=fv.version,
        state=_STATE_TO_PB[fv.state],
        start_step_id=fv.graph.start_step_id,
        steps=[
            flow_pb2.Step(step_id=s.step_id, step_type=s.step_type, routes=dict(s.routes), outcome=_OUTCOME_TO_PB[s.outcome])
            for s in fv.graph.steps
        ],
        execution_timeout=duration(fv.execution_timeout),
        create_time=timestamp(fv.create_time),
        update_time=timestamp(fv.update_time),
        environments=list(fv.environments),
    )
    if fv.publish_time is not None:
        pb.publish_time.CopyFrom(timestamp(fv.publish_time))
    return pb


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(value)


K = TypeVar("K")
V = TypeVar("V")

# What each cache of converted messages may hold: by count for the usual small sessions, by serialized
# bytes for inputs of up to 256 KiB (4,096 of those would be a gigabyte). In memory a message full of
# Struct values takes up to ~6x its serialized size, so 8 MiB here is about 50 MB at worst.
KEPT_MESSAGES = 4096
KEPT_BYTES = 8 * 1024 * 1024


class Kept(Generic[K, V]):
    """The most recently kept messages (or serialized messages, as bytes), at most ``capacity`` of them
    and ``max_bytes`` serialized."""

    def __init__(self, capacity: int = KEPT_MESSAGES, max_bytes: int = KEPT_BYTES):
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0

    def get(self, key: K) -> V | None:
        found = self._items.get(key)
        return None if found is None else found[0]

    def keep(self, key: K, message: V) -> None:
        size = len(message) if isinstance(message, bytes) else message.ByteSize()  # type: ignore[attr-defined]
        earlier = self._items.pop(key, None)
        if earlier is not None:
            self._bytes -= earlier[1]
        self._items[key] = (message, size)
        self._bytes += size
        while len(self._items) > self._capacity or (self._bytes > self._max_bytes and len(self._items) > 1):
            _, (_, freed) = self._items.popitem(last=False)
            self._bytes -= freed

    @property
    def kept_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


class _Recent:
    """The protos of recently converted sessions. (session_id, version) names one immutable state, and a
    change is converted for its RPC answer and again for its watch event: keeping it converts it once."""

    def __init__(self) -> None:
        self._items: Kept[tuple[str, int], session_pb2.Session] = Kept()

    def get(self, s: Session) -> session_pb2.Session:
        found = self._items.get((s.session_id, s.version))
        if found is None:
            found = session_pb2.Session()
            _fill_session(found, s)
            self._keep(s, found)
        return found

    def fill(self, target: session_pb2.Session, s: Session) -> None:
        """Fills ``target`` (a field of a new message): a copy of the proto already made of ``s``, else
        built in place, and then kept, so that ``s``'s RPC answer copies it."""
        found = self._items.get((s.session_id, s.version))
        if found is not None:
            target.CopyFrom(found)
        else:
            _fill_session(target, s)
            self._keep(s, target)

    def _keep(self, s: Session, pb: session_pb2.Session) -> None:
        self._items.keep((s.session_id, s.version), pb)


_recent = _Recent()


def session_pb(s: Session) -> session_pb2.Session:
    """Shared: callers embed it in a message (which copies it) and never modify it."""
    return _recent.get(s)


def _fill_session(pb: session_pb2.Session, s: Session) -> None:
    # Field by field into the message itself: a constructor with keyword arguments builds every
    # Timestamp and map separately and then copies it in, about twice the CPU (every watch event pays it).
    pb.session_id = s.session_id
    pb.flow_id = s.flow_id
    pb.flow_version = s.flow_version
    pb.environment = s.environment
    pb.status = STATUS_TO_PB[s.status]
    pb.outcome = _OUTCOME_TO_PB[s.outcome]
    pb.current_step_id = s.current_step_id
    pb.current_step_type = s.current_step_type
    if s.metadata:
        pb.metadata.update(s.metadata)
    pb.redirect_url = s.redirect_url
    pb.state = s.state
    _set_time(pb.create_time, s.create_time)
    _set_time(pb.update_time, s.update_time)
    _set_time(pb.expire_time, s.expire_time)
    pb.abort_reason = s.abort_reason
    pb.version = s.version
    if s.input:
        pb.input.update(dict(s.input))
    if s.last_step is not None:
        step = pb.last_step
        step.step_id = s.last_step.step_id
        step.step_type = s.last_step.step_type
        step.verdict = s.last_step.verdict
        _set_time(step.report_time, s.last_step.report_time)
    if s.end_time is not None:
        _set_time(pb.end_time, s.end_time)
    if s.error is not None:
        error = pb.error
        error.SetInParent()  # present even when every field is empty
        error.code = s.error.code
        error.message = s.error.message
        error.step_id = s.error.step_id


_CURSOR = re.compile(r"([0-9a-f]+)-([0-9a-f]{16})(?:-([0-9a-f]{8}))?")


def cursor_token(epoch: str, position: LogPosition) -> str:
    """Opaque to clients: "<epoch>-<cursor as 16 hex digits>-<tag>", without "-<tag>" where the event is
    unknown (and as issued before tags). The epoch tells another database apart, the tag a restored copy
    of this one. Within one database the strings sort in commit order."""
    token = f"{epoch}-{position.cursor:016x}"
    return f"{token}-{position.tag}" if position.tag else token


def parse_cursor(token: str) -> tuple[str, LogPosition, bool] | None:
    """(epoch, position, whether it had a tag) of a cursor_token, or None for any other string."""
    match = _CURSOR.fullmatch(token)
    if match is None:
        return None
    epoch, cursor, tag = match.groups()
    return epoch, LogPosition(int(cursor, 16), tag or ""), tag is not None


def byte_size(message: Any) -> int:
    """A message's serialized size (what a list page weighs its answers by)."""
    return int(message.ByteSize())


def event_response(kind: type[T], event: SessionEvent, epoch: str) -> T:
    """A watch response (WatchSessionResponse or WatchSessionsResponse) carrying ``event``, built in place."""
    response = kind()
    pb = response.event  # type: ignore[attr-defined]
    pb.version = event.version
    pb.type = _EVENT_TO_PB[event.type]
    _set_time(pb.event_time, event.event_time)
    _recent.fill(pb.session, event.session)
    pb.cursor = cursor_token(epoch, event.position)
    return response
