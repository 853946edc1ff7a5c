"""Admin routes with vLLM's names, mapped to LoadAdapter / UnloadAdapter. Off unless the gateway runs
with --enable-lora-admin (else 404 naming the flag). The caller's Authorization header is passed through
to the gRPC server, which checks its admin token."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from omni_grpc.v1 import omni_pb2 as pb
from omni_grpc_gateway.calls import rpc
from omni_grpc_gateway.dependencies import Client, Settings
from omni_grpc_gateway.errors import ApiError
from omni_grpc_gateway.routers.responses import errors
from omni_grpc_gateway.schemas.adapters import (
    AdapterOut,
    LoadLoraAdapterRequest,
    LoadLoraAdapterResponse,
    UnloadLoraAdapterRequest,
    UnloadLoraAdapterResponse,
)

router = APIRouter(tags=["adapters"])

_LOAD_PARAMS = {"path": "lora_path", "name": "lora_name", "id": "lora_int_id", "expert": "expert"}
_UNLOAD_PARAMS = {"name": "lora_name", "id": "lora_int_id"}


def require_admin(settings: Settings) -> None:
    if not settings.enable_lora_admin:
        raise ApiError(404, "the adapter admin routes are off; start the gateway with --enable-lora-admin")


@router.post(
    "/v1/load_lora_adapter", dependencies=[Depends(require_admin)], responses=errors(400, 401, 403, 404, 409, 422, 503)
)
async def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request, client: Client) -> LoadLoraAdapterResponse:
    """Load an adapter into the server's table (idempotent for the same path)."""
    message = pb.LoadAdapterRequest(path=body.lora_path, name=body.lora_name, pin=body.pin, expert=body.expert or "")
    if body.lora_int_id is not None:
        message.id = body.lora_int_id
    auth = request.headers.get("authorization")
    reply = await rpc(client.load_adapter(message, authorization=auth), request=request, params=_LOAD_PARAMS)
    request.state.adapter = reply.adapter.name
    return LoadLoraAdapterResponse(adapter=adapter_out(reply.adapter), newly_loaded=reply.newly_loaded)


@router.post("/v1/unload_lora_adapter", dependencies=[Depends(require_admin)], responses=errors(400, 401, 404, 503))
async def unload_lora_adapter(
    body: UnloadLoraAdapterRequest, request: Request, client: Client
) -> UnloadLoraAdapterResponse:
    """Remove an adapter from the server's table; requests already running with it finish."""
    message = pb.UnloadAdapterRequest()
    if body.lora_int_id is not None:
        message.id = body.lora_int_id
    elif body.lora_name is not None:
        message.name = body.lora_name
    auth = request.headers.get("authorization")
    reply = await rpc(client.unload_adapter(message, authorization=auth), request=request, params=_UNLOAD_PARAMS)
    request.state.adapter = reply.adapter.name
    return UnloadLoraAdapterResponse(adapter=adapter_out(reply.adapter))


def adapter_out(adapter: pb.Adapter) -> AdapterOut:
    return AdapterOut(
        id=adapter.id,
        name=adapter.name,
        path=adapter.path,
        rank=adapter.rank,
        alpha=adapter.alpha,
        pinned=adapter.pinned,
        tier=pb.AdapterTier.Name(adapter.tier).removeprefix("ADAPTER_TIER_").lower(),
        size_bytes=adapter.size_bytes,
        expert=adapter.expert,
    )
