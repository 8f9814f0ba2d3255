"""FlowService: thin servicers that parse, call one store operation and convert."""
from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import grpc

from flowsession.v1 import flow_service_pb2 as pb, flow_service_pb2_grpc

from ..domain import flowgraph, limits, paging, validation
from ..domain.errors import Violations
from ..domain.model import FlowGraph, SessionOutcome
from ..store.store import Store
from . import convert, errors


def _definition(
    v: Violations, request: pb.CreateFlowVersionRequest | pb.UpdateFlowVersionRequest
) -> tuple[FlowGraph, timedelta]:
    """The version's graph and timeout. Raises every violation at once, the request's fields' (in ``v``)
    and the graph's, with reason INVALID_FLOW_GRAPH when the graph has any."""
    timeout = convert.execution_timeout(v, request)  # the default if refused: no second violation below
    if flowgraph.oversized(v, request.start_step_id, len(request.steps), timeout):
        v.raise_if_any(reason="INVALID_FLOW_GRAPH")
    unknown = set()
    for i, step in enumerate(request.steps):
        if convert.outcome_from_pb(step.outcome) is None:
            v.add(f"steps[{i}].outcome", f"unknown outcome value {step.outcome}")
            unknown.add(i)
    graph = convert.graph_from_pb(request.start_step_id, request.steps)
    # A step with an unknown outcome was meant as an end step: checked as one, its only fault is that.
    checked = graph
    if unknown:
        steps = tuple(replace(s, outcome=SessionOutcome.ACCEPTED) if i in unknown else s for i, s in enumerate(graph.steps))
        checked = replace(graph, steps=steps)
    flowgraph.check(v, checked, timeout)
    in_graph = any(item.field.startswith(("steps", "start_step_id")) for item in v.items)
    v.raise_if_any(reason="INVALID_FLOW_GRAPH" if in_graph else None)
    return graph, timeout


class FlowService(flow_service_pb2_grpc.FlowServiceServicer):
    def __init__(self, store: Store, environments: frozenset[str], admission: errors.Admission):
        self._admission = admission
        self._store = store
        self._environments = environments

    @errors.unary
    async def CreateFlow(self, request: pb.CreateFlowRequest, context: grpc.aio.ServicerContext) -> pb.CreateFlowResponse:
        v = Violations()
        validation.text(v, "name", request.name, max_len=limits.MAX_NAME, required=True)
        validation.text(v, "description", request.description, max_len=limits.MAX_DESCRIPTION)
        v.raise_if_any()
        flow = await self._store.create_flow(request.name, request.description)
        return pb.CreateFlowResponse(flow=convert.flow_pb(flow))

    @errors.unary
    async def GetFlow(self, request: pb.GetFlowRequest, context: grpc.aio.ServicerContext) -> pb.GetFlowResponse:
        v = Violations()
        validation.identifier(v, "flow_id", request.flow_id)
        v.raise_if_any()
        return pb.GetFlowResponse(flow=convert.flow_pb(await self._store.get_flow(request.flow_id)))

    @errors.unary
    async def ListFlows(self, request: pb.ListFlowsRequest, context: grpc.aio.ServicerContext) -> pb.ListFlowsResponse:
        v = Violations()
        size = validation.page_size(v, request.page_size)
        v.raise_if_any()
        key = self._store.keys.page_key
        after = paging.decode(key, ["flows"], request.page_token)
        flows, token = await paging.read_page(
            key,
            ["flows"],
            self._store.list_flows,
            after,
            size,
            self._store.flow_position,
            convert.flow_pb,
            convert.byte_size,
        )
        return pb.ListFlowsResponse(flows=flows, next_page_token=token)

    @errors.unary
    async def CreateFlowVersion(
        self, request: pb.CreateFlowVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateFlowVersionResponse:
        v = Violations()
        validation.identifier(v, "flow_id", request.flow_id)
        graph, timeout = _definition(v, request)
        fv = await self._store.create_flow_version(request.flow_id, graph, timeout)
        return pb.CreateFlowVersionResponse(flow_version=convert.flow_version_pb(fv))

    @errors.unary
    async def UpdateFlowVersion(
        self, request: pb.UpdateFlowVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateFlowVersionResponse:
        v = Violations()
        validation.identifier(v, "flow_id", request.flow_id)
        validation.version_number(v, "version", request.version)
        graph, timeout = _definition(v, request)
        fv = await self._store.update_flow_version(request.flow_id, request.version, graph, timeout)
        return pb.UpdateFlowVersionResponse(flow_version=convert.flow_version_pb(fv))

    @errors.unary
    async def PublishFlowVersion(
        self, request: pb.PublishFlowVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.PublishFlowVersionResponse:
        v = Violations()
        validation.identifier(v, "flow_id", request.flow_id)
        validation.version_number(v, "version", request.version)
        validation.environment(v, request.environment, self._environments)
        v.raise_if_any()
        fv, flow = await self._store.publish_flow_version(request.flow_id, request.version, request.environment)
        return pb.PublishFlowVersionResponse(flow_version=convert.flow_version_pb(fv), flow=convert.flow_pb(flow))

    @errors.unary
    async def GetFlowVersion(
        self, request: pb.GetFlowVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetFlowVersionResponse:
        v = Violations()
        validation.identifier(v, "flow_id", request.flow_id)
        validation.version_number(v, "version", request.version)
        v.raise_if_any()
        fv = await self._store.get_flow_version(request.flow_id, request.version)
        return pb.GetFlowVersionResponse(flow_version=convert.flow_version_pb(fv))

    @errors.unary
    async def ListFlowVersions(
        self, request: pb.ListFlowVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListFlowVersionsResponse:
        v = Violations()
        validation.identifier(v, "flow_id", request.flow_id)
        size = validation.page_size(v, request.page_size)
        v.raise_if_any()
        key = self._store.keys.page_key
        query = ["flow_versions", request.flow_id]
        after = paging.decode(key, query, request.page_token)
        versions, token = await paging.read_page(
            key,
            query,
            lambda at, limit: self._store.list_flow_versions(request.flow_id, at[0] if at else 0, limit),
            after,
            size,
            lambda fv: [fv.version],
            convert.flow_version_pb,
            convert.byte_size,
        )
        return pb.ListFlowVersionsResponse(flow_versions=versions, next_page_token=token)
