"""The cluster's worker setup hook: run in every worker process of the job, Serve's gRPC proxy included."""

from __future__ import annotations

from omni_grpc.cluster.abandoned_calls import cancel_abandoned_calls
from omni_grpc.cluster.deadlines import carry_grpc_deadlines


def setup() -> None:
    carry_grpc_deadlines()
    cancel_abandoned_calls()
