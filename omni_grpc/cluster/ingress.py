"""The cluster's front: `omni_grpc.v1.OmniService` on Serve's gRPC proxy, the same contract and stubs as one
server. A request goes to a replica chosen by Serve's multiplexing on its adapters (`routing.adapter_route`),
so it lands where they are already loaded; one without adapters goes wherever load is least. Admin RPCs act on
the whole cluster through the registry. Every status the replica's servicer set comes back unchanged; Serve's
own refusals become RESOURCE_EXHAUSTED (backpressure) or UNAVAILABLE (a replica died: retry)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar, cast

import grpc
import ray
from google.protobuf.message import Message
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from omni_grpc.cluster.deadlines import time_remaining
from omni_grpc.cluster.registry import REGISTRY_NAME
from omni_grpc.cluster.routing import adapter_route
from omni_grpc.v1 import omni_pb2 as pb

log = logging.getLogger(__name__)
Reply = tuple[Any, ...]
M = TypeVar("M", bound=Message)
# The caller's metadata the replica needs (the admin token); Serve's own keys stay behind.
_FORWARDED = ("authorization",)


class OmniIngress:
    def __init__(self, replicas: DeploymentHandle[Any]) -> None:
        self._replicas = replicas
        # Ray types an actor's methods loosely: the registry is used as what it is, untyped.
        self._registry: Any = ray.get_actor(REGISTRY_NAME, namespace="serve")

    # ---- generation --------------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext) -> pb.GenerateResponse:
        handle = self._replicas.options(multiplexed_model_id=adapter_route(request))
        remaining = time_remaining(grpc_context)
        reply = await _guarded(handle.generate.remote(request.SerializeToString(), _metadata(grpc_context), remaining))
        return _answer(reply, grpc_context, pb.GenerateResponse)

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        handle = self._replicas.options(multiplexed_model_id=adapter_route(request.request), stream=True)
        stream = cast(
            DeploymentResponseGenerator[Reply],
            handle.generate_stream.remote(
                request.SerializeToString(), _metadata(grpc_context), time_remaining(grpc_context)
            ),
        )
        failed: Reply | None = None
        try:
            async for reply in stream:
                event = _answer(reply, grpc_context, pb.GenerateEvent)
                if reply[0] != "ok":
                    failed = reply
                    break
                yield event
        except (BackPressureError, RayActorError, ActorDiedError, ActorUnavailableError) as exc:
            failed = _serve_refusal(exc)
            _answer(failed, grpc_context, pb.GenerateEvent)
        finally:
            cast(Any, stream).cancel()  # the client left (or the stream ended): the replica stops at the next step
        if failed is not None:
            # A stream's status is taken from the context only when its method raises (Serve's rule).
            raise StreamRefused(failed[2])

    # ---- admin, cluster-wide -----------------------------------------------------------------------------

    async def LoadAdapter(
        self, request: pb.LoadAdapterRequest, grpc_context: RayServegRPCContext
    ) -> pb.LoadAdapterResponse:
        """Validated (and loaded) once, on one replica; then registered, and every replica loads it too."""
        reply = await self._call("LoadAdapter", request, grpc_context)
        response = _answer(reply, grpc_context, pb.LoadAdapterResponse)
        if reply[0] == "ok":
            adapter = response.adapter
            await self._registry.register.remote(
                {
                    "path": adapter.path or request.path,
                    "name": adapter.name,
                    "id": adapter.id,
                    "pin": request.pin,
                    "expert": adapter.expert,
                }
            )
        return response

    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, grpc_context: RayServegRPCContext
    ) -> pb.UnloadAdapterResponse:
        """Removed from every replica (each one's running requests finish first, as on one server)."""
        refusal = await self._replicas.admin_refusal.remote("UnloadAdapter", _metadata(grpc_context))
        if refusal is not None:
            return _answer(("error", "UNAUTHENTICATED", refusal, []), grpc_context, pb.UnloadAdapterResponse)
        holders = await self._adapters()
        match = next((a for a in holders if _selects(request, a)), None)
        if match is None:
            # No replica holds it: the single server's NOT_FOUND, from a replica.
            return _answer(
                await self._call("UnloadAdapter", request, grpc_context), grpc_context, pb.UnloadAdapterResponse
            )
        await self._registry.unregister.remote(match.path, match.expert)
        return pb.UnloadAdapterResponse(adapter=match)

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, grpc_context: RayServegRPCContext
    ) -> pb.ListAdaptersResponse:
        """Each adapter once, with the replicas that hold it and its tier on each."""
        reply = await self._call("ListAdapters", request, grpc_context)
        response = _answer(reply, grpc_context, pb.ListAdaptersResponse)
        if reply[0] == "ok":
            # The server's paths are for admins only, as on one server.
            show_paths = await self._replicas.is_admin.remote(_metadata(grpc_context))
            del response.adapters[:]
            for adapter in await self._adapters():
                if not show_paths:
                    adapter.path = ""
                response.adapters.append(adapter)
        return response

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, grpc_context: RayServegRPCContext
    ) -> pb.GetServerInfoResponse:
        response = _answer(
            await self._call("GetServerInfo", request, grpc_context), grpc_context, pb.GetServerInfoResponse
        )
        response.replicas.extend(sorted(await self._registry.reports.remote()))
        return response

    async def _call(self, method: str, request: Any, grpc_context: RayServegRPCContext) -> Reply:
        return await _guarded(self._replicas.call.remote(method, request.SerializeToString(), _metadata(grpc_context)))

    async def _adapters(self) -> list[pb.Adapter]:
        """Every adapter some replica holds, once (by path and expert), with where it is and on which tier."""
        merged: dict[tuple[str, str], pb.Adapter] = {}
        reports: dict[str, list[bytes]] = await self._registry.reports.remote()
        for replica, adapters in sorted(reports.items()):
            for raw in adapters:
                adapter = pb.Adapter.FromString(raw)
                key = (adapter.path, adapter.expert)
                entry = merged.setdefault(key, adapter)
                if entry is not adapter:
                    entry.use_count += adapter.use_count
                    entry.in_use += adapter.in_use
                    entry.loads += adapter.loads
                    entry.hits += adapter.hits
                entry.residency.add(replica=replica, tier=adapter.tier)
        return list(merged.values())


class StreamRefused(Exception):
    """Ends a refused stream; Serve sends the status set on the context."""


def _selects(request: pb.UnloadAdapterRequest, adapter: pb.Adapter) -> bool:
    which = request.WhichOneof("adapter")
    if which == "id":
        return adapter.id == request.id
    if which == "name":
        return adapter.name == request.name
    if which == "path":
        return adapter.path == os.path.realpath(request.path) and adapter.expert == request.expert
    return False


def _metadata(grpc_context: RayServegRPCContext) -> list[tuple[str, str]]:
    return [(key, value) for key, value in grpc_context.invocation_metadata() if key in _FORWARDED]


async def _guarded(call: Awaitable[Reply]) -> Reply:
    try:
        return await call
    except (BackPressureError, RayActorError, ActorDiedError, ActorUnavailableError) as exc:
        return _serve_refusal(exc)


def _serve_refusal(exc: Exception) -> Reply:
    if isinstance(exc, BackPressureError):
        return ("error", "RESOURCE_EXHAUSTED", "every replica is at capacity (max_queued_requests); retry later", [])
    log.warning("a replica failed mid-call: %s", exc)
    return ("error", "UNAVAILABLE", "the replica serving this call died; retry (another replica takes it)", [])


def _answer(reply: Reply, grpc_context: RayServegRPCContext, kind: type[M]) -> M:
    """The reply's message; or its status set on the call, and an empty message (Serve sends the status)."""
    if reply[0] == "ok":
        return kind.FromString(reply[1])
    _, code, details, trailing = reply
    grpc_context.set_code(grpc.StatusCode[code])
    grpc_context.set_details(details)
    if trailing:
        grpc_context.set_trailing_metadata(list(trailing))
    return kind()
