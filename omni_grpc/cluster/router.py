"""Serve's request router for the replicas: adapter affinity that does not depend on Serve's lagging view of
who holds what.

Serve learns which replica holds a multiplexed id only once that replica has loaded it and reported back; until
then its default router sends the next requests for the same id anywhere, and a new adapter gets loaded on
every replica. Here the replicas are ranked, for a request with adapters: those known to hold them first, then
every other in the order of a rendezvous hash of (id, replica), which depends on nothing that changes while
Serve catches up: concurrent first requests, and those that follow before the holder is known, agree on one
replica, and the hash spreads adapters evenly over the replicas. A rank whose replicas are all full (at
max_ongoing_requests) gives way to the next: a hot adapter spills to a second replica instead of queueing on
one. Requests without adapters go by the power of two choices.

`LoadOnlyRouter` is plain load balancing that ignores adapters (the power of two choices for every request):
the baseline `omni-grpc bench --cluster` measures affinity against.
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import (
    FIFOMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)


def rendezvous_order(route: str, replicas: list[RunningReplica]) -> list[RunningReplica]:
    """Replicas from the most to the least preferred for `route`: the same order wherever it is computed."""

    def score(replica: RunningReplica) -> bytes:
        return hashlib.sha256(f"{route}|{replica.replica_id.unique_id}".encode()).digest()

    return sorted(replicas, key=score, reverse=True)


def two_choices(replicas: list[RunningReplica]) -> list[list[RunningReplica]]:
    """Two replicas at random, as one rank: Serve sends the request to the less loaded of them."""
    return [random.sample(replicas, min(2, len(replicas)))]


class AdapterAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        route = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not route:
            return two_choices(candidate_replicas)
        ordered = rendezvous_order(route, candidate_replicas)
        holders = [replica for replica in ordered if route in replica.multiplexed_model_ids]
        others = [replica for replica in ordered if route not in replica.multiplexed_model_ids]
        ranks = [holders] if holders else []
        return ranks + [[replica] for replica in others]


class LoadOnlyRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        return two_choices(candidate_replicas) if candidate_replicas else []
