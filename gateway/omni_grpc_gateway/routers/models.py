"""GET /v1/models: the base model, then every adapter in the server's table."""

from __future__ import annotations

from fastapi import APIRouter, Request

from omni_grpc_gateway.calls import rpc
from omni_grpc_gateway.dependencies import Client
from omni_grpc_gateway.routers.responses import errors
from omni_grpc_gateway.schemas.models import ModelCard, ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models", responses=errors(503, 504))
async def list_models(request: Request, client: Client) -> ModelList:
    info = await rpc(client.server_info(), request=request)
    # An admin's token (passed through) shows each adapter's path as its `root`; others see none.
    listing = await rpc(client.list_adapters(authorization=request.headers.get("authorization")), request=request)
    base = ModelCard(id=info.model, created=info.started_at, root=info.model)
    adapters = [
        ModelCard(id=adapter.name, created=info.started_at, root=adapter.path, parent=info.model)
        for adapter in listing.adapters
    ]
    return ModelList(data=[base, *adapters])
