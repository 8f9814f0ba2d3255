import datetime

from flowsession.v1 import session_pb2 as _session_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateSessionRequest(_message.Message):
    __slots__ = ("flow_id", "environment", "input", "metadata", "redirect_url", "state", "request_id")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    REDIRECT_URL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    flow_id: str
    environment: str
    input: _struct_pb2.Struct
    metadata: _containers.ScalarMap[str, str]
    redirect_url: str
    state: str
    request_id: str
    def __init__(self, flow_id: _Optional[str] = ..., environment: _Optional[str] = ..., input: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., redirect_url: _Optional[str] = ..., state: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session", "session_token")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session: _session_pb2.Session
    session_token: str
    def __init__(self, session: _Optional[_Union[_session_pb2.Session, _Mapping]] = ..., session_token: _Optional[str] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("environment", "session_id")
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    environment: str
    session_id: str
    def __init__(self, environment: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: _session_pb2.Session
    def __init__(self, session: _Optional[_Union[_session_pb2.Session, _Mapping]] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("environment", "flow_id", "statuses", "page_size", "page_token")
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    environment: str
    flow_id: str
    statuses: _containers.RepeatedScalarFieldContainer[_session_pb2.SessionStatus]
    page_size: int
    page_token: str
    def __init__(self, environment: _Optional[str] = ..., flow_id: _Optional[str] = ..., statuses: _Optional[_Iterable[_Union[_session_pb2.SessionStatus, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[_session_pb2.Session]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[_session_pb2.Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ReportStepResultRequest(_message.Message):
    __slots__ = ("environment", "session_id", "step_id", "verdict", "request_id", "expected_version")
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    environment: str
    session_id: str
    step_id: str
    verdict: str
    request_id: str
    expected_version: int
    def __init__(self, environment: _Optional[str] = ..., session_id: _Optional[str] = ..., step_id: _Optional[str] = ..., verdict: _Optional[str] = ..., request_id: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class ReportStepResultResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: _session_pb2.Session
    def __init__(self, session: _Optional[_Union[_session_pb2.Session, _Mapping]] = ...) -> None: ...

class AbortSessionRequest(_message.Message):
    __slots__ = ("environment", "session_id", "reason", "expected_version")
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    environment: str
    session_id: str
    reason: str
    expected_version: int
    def __init__(self, environment: _Optional[str] = ..., session_id: _Optional[str] = ..., reason: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class AbortSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: _session_pb2.Session
    def __init__(self, session: _Optional[_Union[_session_pb2.Session, _Mapping]] = ...) -> None: ...

class FailSessionRequest(_message.Message):
    __slots__ = ("environment", "session_id", "step_id", "error_code", "error_message", "expected_version")
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    environment: str
    session_id: str
    step_id: str
    error_code: str
    error_message: str
    expected_version: int
    def __init__(self, environment: _Optional[str] = ..., session_id: _Optional[str] = ..., step_id: _Optional[str] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class FailSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: _session_pb2.Session
    def __init__(self, session: _Optional[_Union[_session_pb2.Session, _Mapping]] = ...) -> None: ...

class WatchSessionRequest(_message.Message):
    __slots__ = ("environment", "session_id", "after_version")
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    environment: str
    session_id: str
    after_version: int
    def __init__(self, environment: _Optional[str] = ..., session_id: _Optional[str] = ..., after_version: _Optional[int] = ...) -> None: ...

class WatchSessionResponse(_message.Message):
    __slots__ = ("event", "heartbeat")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    event: _session_pb2.SessionEvent
    heartbeat: WatchHeartbeat
    def __init__(self, event: _Optional[_Union[_session_pb2.SessionEvent, _Mapping]] = ..., heartbeat: _Optional[_Union[WatchHeartbeat, _Mapping]] = ...) -> None: ...

class WatchHeartbeat(_message.Message):
    __slots__ = ("cursor", "version", "heartbeat_time")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIME_FIELD_NUMBER: _ClassVar[int]
    cursor: str
    version: int
    heartbeat_time: _timestamp_pb2.Timestamp
    def __init__(self, cursor: _Optional[str] = ..., version: _Optional[int] = ..., heartbeat_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class WatchSessionsRequest(_message.Message):
    __slots__ = ("environment", "flow_id", "statuses", "after_cursor", "include_current")
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    AFTER_CURSOR_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CURRENT_FIELD_NUMBER: _ClassVar[int]
    environment: str
    flow_id: str
    statuses: _containers.RepeatedScalarFieldContainer[_session_pb2.SessionStatus]
    after_cursor: str
    include_current: bool
    def __init__(self, environment: _Optional[str] = ..., flow_id: _Optional[str] = ..., statuses: _Optional[_Iterable[_Union[_session_pb2.SessionStatus, str]]] = ..., after_cursor: _Optional[str] = ..., include_current: _Optional[bool] = ...) -> None: ...

class WatchSessionsResponse(_message.Message):
    __slots__ = ("event", "heartbeat")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    event: _session_pb2.SessionEvent
    heartbeat: WatchHeartbeat
    def __init__(self, event: _Optional[_Union[_session_pb2.SessionEvent, _Mapping]] = ..., heartbeat: _Optional[_Union[WatchHeartbeat, _Mapping]] = ...) -> None: ...
