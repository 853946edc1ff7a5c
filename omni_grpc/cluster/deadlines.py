"""A client's gRPC deadline, carried through Serve's gRPC proxy to the replica.

Serve's proxy copies the caller's metadata into the `RayServegRPCContext` the ingress receives, but not the
call's deadline (gRPC keeps it out of the metadata). `carry_grpc_deadlines` runs as part of the cluster's
worker setup hook (`worker_setup`), in every worker process of the job (Serve's proxy included), and makes
each such context record the deadline too, as wall-clock time: the proxy and the ingress may be different
processes, or nodes. Where it did not run (a Serve instance started by another job) a deadline still ends
the call, as a cancellation.
"""

from __future__ import annotations

import time
from typing import Any

_ATTRIBUTE = "omni_deadline"


def carry_grpc_deadlines() -> None:
    from ray.serve.grpc_util import RayServegRPCContext

    original = RayServegRPCContext.__init__
    if getattr(original, "carries_deadline", False):
        return

    def init(self: RayServegRPCContext, grpc_context: Any) -> None:
        original(self, grpc_context)
        remaining = grpc_context.time_remaining()
        setattr(self, _ATTRIBUTE, None if remaining is None else time.time() + remaining)

    init.carries_deadline = True  # type: ignore[attr-defined]  # a marker on the function: installed once
    RayServegRPCContext.__init__ = init  # type: ignore[method-assign]  # Serve has no hook for this


def time_remaining(grpc_context: object) -> float | None:
    """Seconds left before the caller's deadline (None: no deadline, or not carried)."""
    deadline = getattr(grpc_context, _ATTRIBUTE, None)
    return None if deadline is None else max(0.0, deadline - time.time())
