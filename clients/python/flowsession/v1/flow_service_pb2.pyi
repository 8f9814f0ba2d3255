import datetime

from flowsession.v1 import flow_pb2 as _flow_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateFlowRequest(_message.Message):
    __slots__ = ("name", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class CreateFlowResponse(_message.Message):
    __slots__ = ("flow",)
    FLOW_FIELD_NUMBER: _ClassVar[int]
    flow: _flow_pb2.Flow
    def __init__(self, flow: _Optional[_Union[_flow_pb2.Flow, _Mapping]] = ...) -> None: ...

class GetFlowRequest(_message.Message):
    __slots__ = ("flow_id",)
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    flow_id: str
    def __init__(self, flow_id: _Optional[str] = ...) -> None: ...

class GetFlowResponse(_message.Message):
    __slots__ = ("flow",)
    FLOW_FIELD_NUMBER: _ClassVar[int]
    flow: _flow_pb2.Flow
    def __init__(self, flow: _Optional[_Union[_flow_pb2.Flow, _Mapping]] = ...) -> None: ...

class ListFlowsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListFlowsResponse(_message.Message):
    __slots__ = ("flows", "next_page_token")
    FLOWS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    flows: _containers.RepeatedCompositeFieldContainer[_flow_pb2.Flow]
    next_page_token: str
    def __init__(self, flows: _Optional[_Iterable[_Union[_flow_pb2.Flow, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CreateFlowVersionRequest(_message.Message):
    __slots__ = ("flow_id", "start_step_id", "steps", "execution_timeout")
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    START_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    flow_id: str
    start_step_id: str
    steps: _containers.RepeatedCompositeFieldContainer[_flow_pb2.Step]
    execution_timeout: _duration_pb2.Duration
    def __init__(self, flow_id: _Optional[str] = ..., start_step_id: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[_flow_pb2.Step, _Mapping]]] = ..., execution_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class CreateFlowVersionResponse(_message.Message):
    __slots__ = ("flow_version",)
    FLOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    flow_version: _flow_pb2.FlowVersion
    def __init__(self, flow_version: _Optional[_Union[_flow_pb2.FlowVersion, _Mapping]] = ...) -> None: ...

class UpdateFlowVersionRequest(_message.Message):
    __slots__ = ("flow_id", "version", "start_step_id", "steps", "execution_timeout")
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    START_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    flow_id: str
    version: int
    start_step_id: str
    steps: _containers.RepeatedCompositeFieldContainer[_flow_pb2.Step]
    execution_timeout: _duration_pb2.Duration
    def __init__(self, flow_id: _Optional[str] = ..., version: _Optional[int] = ..., start_step_id: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[_flow_pb2.Step, _Mapping]]] = ..., execution_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class UpdateFlowVersionResponse(_message.Message):
    __slots__ = ("flow_version",)
    FLOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    flow_version: _flow_pb2.FlowVersion
    def __init__(self, flow_version: _Optional[_Union[_flow_pb2.FlowVersion, _Mapping]] = ...) -> None: ...

class PublishFlowVersionRequest(_message.Message):
    __slots__ = ("flow_id", "version", "environment")
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    flow_id: str
    version: int
    environment: str
    def __init__(self, flow_id: _Optional[str] = ..., version: _Optional[int] = ..., environment: _Optional[str] = ...) -> None: ...

class PublishFlowVersionResponse(_message.Message):
    __slots__ = ("flow_version", "flow")
    FLOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    FLOW_FIELD_NUMBER: _ClassVar[int]
    flow_version: _flow_pb2.FlowVersion
    flow: _flow_pb2.Flow
    def __init__(self, flow_version: _Optional[_Union[_flow_pb2.FlowVersion, _Mapping]] = ..., flow: _Optional[_Union[_flow_pb2.Flow, _Mapping]] = ...) -> None: ...

class GetFlowVersionRequest(_message.Message):
    __slots__ = ("flow_id", "version")
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    flow_id: str
    version: int
    def __init__(self, flow_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetFlowVersionResponse(_message.Message):
    __slots__ = ("flow_version",)
    FLOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    flow_version: _flow_pb2.FlowVersion
    def __init__(self, flow_version: _Optional[_Union[_flow_pb2.FlowVersion, _Mapping]] = ...) -> None: ...

class ListFlowVersionsRequest(_message.Message):
    __slots__ = ("flow_id", "page_size", "page_token")
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    flow_id: str
    page_size: int
    page_token: str
    def __init__(self, flow_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListFlowVersionsResponse(_message.Message):
    __slots__ = ("flow_versions", "next_page_token")
    FLOW_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    flow_versions: _containers.RepeatedCompositeFieldContainer[_flow_pb2.FlowVersion]
    next_page_token: str
    def __init__(self, flow_versions: _Optional[_Iterable[_Union[_flow_pb2.FlowVersion, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
