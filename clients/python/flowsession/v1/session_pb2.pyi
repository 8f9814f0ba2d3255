import datetime

from flowsession.v1 import flow_pb2 as _flow_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATUS_UNSPECIFIED: _ClassVar[SessionStatus]
    SESSION_STATUS_RUNNING: _ClassVar[SessionStatus]
    SESSION_STATUS_COMPLETED: _ClassVar[SessionStatus]
    SESSION_STATUS_ABORTED: _ClassVar[SessionStatus]
    SESSION_STATUS_EXPIRED: _ClassVar[SessionStatus]
    SESSION_STATUS_ERROR: _ClassVar[SessionStatus]

class SessionEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_EVENT_TYPE_UNSPECIFIED: _ClassVar[SessionEventType]
    SESSION_EVENT_TYPE_CREATED: _ClassVar[SessionEventType]
    SESSION_EVENT_TYPE_STEP_COMPLETED: _ClassVar[SessionEventType]
    SESSION_EVENT_TYPE_COMPLETED: _ClassVar[SessionEventType]
    SESSION_EVENT_TYPE_ABORTED: _ClassVar[SessionEventType]
    SESSION_EVENT_TYPE_EXPIRED: _ClassVar[SessionEventType]
    SESSION_EVENT_TYPE_ERROR: _ClassVar[SessionEventType]
SESSION_STATUS_UNSPECIFIED: SessionStatus
SESSION_STATUS_RUNNING: SessionStatus
SESSION_STATUS_COMPLETED: SessionStatus
SESSION_STATUS_ABORTED: SessionStatus
SESSION_STATUS_EXPIRED: SessionStatus
SESSION_STATUS_ERROR: SessionStatus
SESSION_EVENT_TYPE_UNSPECIFIED: SessionEventType
SESSION_EVENT_TYPE_CREATED: SessionEventType
SESSION_EVENT_TYPE_STEP_COMPLETED: SessionEventType
SESSION_EVENT_TYPE_COMPLETED: SessionEventType
SESSION_EVENT_TYPE_ABORTED: SessionEventType
SESSION_EVENT_TYPE_EXPIRED: SessionEventType
SESSION_EVENT_TYPE_ERROR: SessionEventType

class StepResult(_message.Message):
    __slots__ = ("step_id", "step_type", "verdict", "report_time")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_TYPE_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REPORT_TIME_FIELD_NUMBER: _ClassVar[int]
    step_id: str
    step_type: str
    verdict: str
    report_time: _timestamp_pb2.Timestamp
    def __init__(self, step_id: _Optional[str] = ..., step_type: _Optional[str] = ..., verdict: _Optional[str] = ..., report_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SessionError(_message.Message):
    __slots__ = ("code", "message", "step_id")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    step_id: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., step_id: _Optional[str] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "flow_id", "flow_version", "environment", "status", "outcome", "current_step_id", "current_step_type", "last_step", "metadata", "redirect_url", "state", "input", "create_time", "update_time", "expire_time", "end_time", "error", "abort_reason", "version")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    FLOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STEP_TYPE_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    REDIRECT_URL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ABORT_REASON_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    flow_id: str
    flow_version: int
    environment: str
    status: SessionStatus
    outcome: _flow_pb2.SessionOutcome
    current_step_id: str
    current_step_type: str
    last_step: StepResult
    metadata: _containers.ScalarMap[str, str]
    redirect_url: str
    state: str
    input: _struct_pb2.Struct
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    error: SessionError
    abort_reason: str
    version: int
    def __init__(self, session_id: _Optional[str] = ..., flow_id: _Optional[str] = ..., flow_version: _Optional[int] = ..., environment: _Optional[str] = ..., status: _Optional[_Union[SessionStatus, str]] = ..., outcome: _Optional[_Union[_flow_pb2.SessionOutcome, str]] = ..., current_step_id: _Optional[str] = ..., current_step_type: _Optional[str] = ..., last_step: _Optional[_Union[StepResult, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., redirect_url: _Optional[str] = ..., state: _Optional[str] = ..., input: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[_Union[SessionError, _Mapping]] = ..., abort_reason: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class SessionEvent(_message.Message):
    __slots__ = ("version", "type", "event_time", "session", "cursor")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    version: int
    type: SessionEventType
    event_time: _timestamp_pb2.Timestamp
    session: Session
    cursor: str
    def __init__(self, version: _Optional[int] = ..., type: _Optional[_Union[SessionEventType, str]] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., session: _Optional[_Union[Session, _Mapping]] = ..., cursor: _Optional[str] = ...) -> None: ...
