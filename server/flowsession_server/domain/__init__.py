"""Pure domain: flow graphs, the session state machine, validation and domain errors.

No grpc, no SQL and no clock reads here: callers pass ``now``.
"""
