"""Flow graph validation and routing."""
from __future__ import annotations

from collections import defaultdict, deque
from datetime import timedelta

from . import limits, validation
from .errors import FieldViolation, InvalidArgument, Violations
from .model import MAX_EXECUTION_TIMEOUT, MIN_EXECUTION_TIMEOUT, FlowGraph, Step


def validate(graph: FlowGraph, execution_timeout: timedelta) -> None:
    """Raises InvalidArgument naming every offending step (field paths like ``steps[2].routes``)."""
    v = Violations()
    check(v, graph, execution_timeout)
    v.raise_if_any(reason="INVALID_FLOW_GRAPH")


def check(v: Violations, graph: FlowGraph, execution_timeout: timedelta) -> None:
    """Adds a violation to ``v`` for every problem of the graph and its timeout; a graph of more than
    MAX_STEPS steps is refused on its size alone (see ``oversized``)."""
    if not _outline(v, graph.start_step_id, len(graph.steps), execution_timeout):
        return

    by_id: dict[str, Step] = {}
    step_ids = {s.step_id for s in graph.steps}
    for i, step in enumerate(graph.steps):
        path = f"steps[{i}]"
        validation.token(v, f"{path}.step_id", step.step_id, max_len=limits.MAX_STEP_ID)
        validation.token(v, f"{path}.step_type", step.step_type, max_len=limits.MAX_STEP_TYPE)
        if step.step_id in by_id:
            v.add(f"{path}.step_id", f"step {step.step_id!r} is defined more than once")
        else:
            by_id[step.step_id] = step
        if step.is_end:
            if step.routes:
                v.add(f"{path}.routes", f"end step {step.step_id!r} has an outcome and must have no routes")
        elif not step.routes:
            v.add(f"{path}.routes", f"step {step.step_id!r} needs at least one route, or an outcome to be an end step")
        if len(step.routes) > limits.MAX_ROUTES:
            v.add(f"{path}.routes", f"step {step.step_id!r} has more than {limits.MAX_ROUTES} routes")
        for verdict, target in step.routes.items():
            validation.token(v, f"{path}.routes[{verdict!r}]", verdict, max_len=limits.MAX_VERDICT)
            if target not in step_ids:
                v.add(f"{path}.routes[{verdict!r}]", f"step {step.step_id!r} routes to unknown step {target!r}")

    start = by_id.get(graph.start_step_id)
    if graph.start_step_id and graph.steps:
        if start is None:
            v.add("start_step_id", f"start step {graph.start_step_id!r} is not among the steps")
        elif start.is_end:
            v.add("start_step_id", f"start step {graph.start_step_id!r} must not be an end step")
    if start is not None:
        reachable = _reachable(by_id, start.step_id)
        finishing = _finishing(by_id)
        for i, step in enumerate(graph.steps):
            if not step.step_id:
                continue
            if step.step_id not in reachable:
                v.add(f"steps[{i}]", f"step {step.step_id!r} is not reachable from the start step")
            elif step.step_id not in finishing:
                # A loop with no way out: its sessions could only be aborted, failed or expire.
                v.add(f"steps[{i}].routes", f"no end step can be reached from step {step.step_id!r}")


def oversized(v: Violations, start_step_id: str, steps: int, execution_timeout: timedelta) -> bool:
    """For a request not yet converted: True, with the violations ``check`` adds, when the graph has more
    than MAX_STEPS steps. Such a graph is refused on its size alone, its steps neither converted nor
    checked: a request of 150,000 steps (4 MB) held the event loop, and every other call, for 2 s."""
    return steps > limits.MAX_STEPS and not _outline(v, start_step_id, steps, execution_timeout)


def _outline(v: Violations, start_step_id: str, steps: int, execution_timeout: timedelta) -> bool:
    """Checks what a graph is before its steps; False when it has too many to check them."""
    if not MIN_EXECUTION_TIMEOUT <= execution_timeout <= MAX_EXECUTION_TIMEOUT:
        v.add("execution_timeout", "must be between 1 second and 30 days")
    if not steps:
        v.add("steps", "a flow version needs at least one step")
    elif steps > limits.MAX_STEPS:
        v.add("steps", f"must have at most {limits.MAX_STEPS} steps (got {steps})")
    validation.token(v, "start_step_id", start_step_id, max_len=limits.MAX_STEP_ID)
    return steps <= limits.MAX_STEPS


def _reachable(by_id: dict[str, Step], start: str) -> set[str]:
    seen = {start}
    todo = deque([start])
    while todo:
        for target in by_id[todo.popleft()].routes.values():
            if target in by_id and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def _finishing(by_id: dict[str, Step]) -> set[str]:
    """The steps from which an end step can be reached, walking the routes back from the end steps. A step
    already refused for a dead end (no routes, or a route to an unknown step) counts as one, so its fault
    is reported once, at that step, not again at every step leading to it."""
    sources: defaultdict[str, list[str]] = defaultdict(list)
    for step in by_id.values():
        for target in step.routes.values():
            sources[target].append(step.step_id)
    seen = {s.step_id for s in by_id.values() if s.is_end or not s.routes or not set(s.routes.values()) <= by_id.keys()}
    todo = deque(seen)
    while todo:
        for source in sources[todo.popleft()]:
            if source not in seen:
                seen.add(source)
                todo.append(source)
    return seen


def route(graph: FlowGraph, step_id: str, verdict: str) -> Step:
    """The step a verdict leads to. The graph was validated at creation, so targets exist."""
    step = graph.step(step_id)
    if step is None or verdict not in step.routes:
        allowed = ", ".join(sorted(step.routes)) if step else ""
        raise InvalidArgument.of(
            [FieldViolation("verdict", f"step {step_id!r} has no route for verdict {verdict!r}; allowed: {allowed}")],
            reason="UNKNOWN_VERDICT",
        )
    target = graph.step(step.routes[verdict])
    assert target is not None
    return target

