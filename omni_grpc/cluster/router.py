"""Serve's request router for the replicas: adapter affinity that does not depend on Serve's lagging view of
who holds what.

Serve learns which replica holds a multiplexed id only once that replica has loaded it and reported back; until
then its default router sends the next requests for the same id anywhere, and a new adapter gets loaded on
every replica. Here the replicas are ranked, for a request with adapters: those known to hold them first, then
every other, those holding the fewest adapters first (the cluster's device memory fills evenly), ties broken
by a rendezvous hash of (id, replica): concurrent first requests, which see the same state, agree on one
replica. A rank whose replicas are all full (at max_ongoing_requests) gives way to the next: a hot adapter
spills to a second replica instead of queueing on one. Requests without adapters go by the power of two
choices.
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


class AdapterAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        route = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not route:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        ordered = rendezvous_order(route, candidate_replicas)
        holders = [replica for replica in ordered if route in replica.multiplexed_model_ids]
        others = [replica for replica in ordered if route not in replica.multiplexed_model_ids]
        others.sort(key=lambda replica: len(replica.multiplexed_model_ids))  # stable: the hash breaks ties
        ranks = [holders] if holders else []
        return ranks + [[replica] for replica in others]
