import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_OUTCOME_UNSPECIFIED: _ClassVar[SessionOutcome]
    SESSION_OUTCOME_ACCEPTED: _ClassVar[SessionOutcome]
    SESSION_OUTCOME_REJECTED: _ClassVar[SessionOutcome]

class FlowVersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FLOW_VERSION_STATE_UNSPECIFIED: _ClassVar[FlowVersionState]
    FLOW_VERSION_STATE_DRAFT: _ClassVar[FlowVersionState]
    FLOW_VERSION_STATE_PUBLISHED: _ClassVar[FlowVersionState]
SESSION_OUTCOME_UNSPECIFIED: SessionOutcome
SESSION_OUTCOME_ACCEPTED: SessionOutcome
SESSION_OUTCOME_REJECTED: SessionOutcome
FLOW_VERSION_STATE_UNSPECIFIED: FlowVersionState
FLOW_VERSION_STATE_DRAFT: FlowVersionState
FLOW_VERSION_STATE_PUBLISHED: FlowVersionState

class Step(_message.Message):
    __slots__ = ("step_id", "step_type", "routes", "outcome")
    class RoutesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_TYPE_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    step_id: str
    step_type: str
    routes: _containers.ScalarMap[str, str]
    outcome: SessionOutcome
    def __init__(self, step_id: _Optional[str] = ..., step_type: _Optional[str] = ..., routes: _Optional[_Mapping[str, str]] = ..., outcome: _Optional[_Union[SessionOutcome, str]] = ...) -> None: ...

class Flow(_message.Message):
    __slots__ = ("flow_id", "name", "description", "create_time", "update_time", "published_versions", "latest_version")
    class PublishedVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    flow_id: str
    name: str
    description: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    published_versions: _containers.ScalarMap[str, int]
    latest_version: int
    def __init__(self, flow_id: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., published_versions: _Optional[_Mapping[str, int]] = ..., latest_version: _Optional[int] = ...) -> None: ...

class FlowVersion(_message.Message):
    __slots__ = ("flow_id", "version", "state", "start_step_id", "steps", "execution_timeout", "create_time", "update_time", "publish_time", "environments")
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    START_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_TIME_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENTS_FIELD_NUMBER: _ClassVar[int]
    flow_id: str
    version: int
    state: FlowVersionState
    start_step_id: str
    steps: _containers.RepeatedCompositeFieldContainer[Step]
    execution_timeout: _duration_pb2.Duration
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    publish_time: _timestamp_pb2.Timestamp
    environments: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, flow_id: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[FlowVersionState, str]] = ..., start_step_id: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[Step, _Mapping]]] = ..., execution_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., publish_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., environments: _Optional[_Iterable[str]] = ...) -> None: ...
