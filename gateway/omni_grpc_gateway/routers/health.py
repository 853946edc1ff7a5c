"""GET /health: 200 only while the gRPC server reports SERVING (a load balancer's readiness probe)."""

from __future__ import annotations

from fastapi import APIRouter

from omni_grpc_gateway.dependencies import Client
from omni_grpc_gateway.errors import ApiError
from omni_grpc_gateway.routers.responses import errors
from omni_grpc_gateway.schemas.health import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/health", responses=errors(503))
async def health(client: Client) -> HealthResponse:
    if not await client.serving():
        raise ApiError(503, "the gRPC server is not serving (starting, stopping or unreachable)")
    return HealthResponse(status="serving")
