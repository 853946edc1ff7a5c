"""GET /metrics: the gateway's Prometheus metrics (the server exports its own on --metrics-port)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from omni_grpc_gateway.metrics import GatewayMetrics

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    registry: GatewayMetrics = request.app.state.metrics
    return Response(registry.exposition(), media_type=registry.content_type)
