"""The gateway's ASGI app: one gRPC channel for its lifetime, one router per resource."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from omni_grpc_gateway.errors import install_error_handlers
from omni_grpc_gateway.grpc_client import OmniClient
from omni_grpc_gateway.metrics import GatewayMetrics
from omni_grpc_gateway.middleware import AccessLog, BodyLimit, RequireJson
from omni_grpc_gateway.routers import adapters, chat, health, images, metrics, models, videos
from omni_grpc_gateway.settings import GatewaySettings

DESCRIPTION = """OpenAI-style JSON in front of the omni-grpc gRPC service.

Generation bodies take adapters and sampling in either of two shapes, never both at once:
the guide's `lora_request` + `sampling_params`, or vLLM-Omni's `lora` + flat fields.
Every error is an OpenAI error object; its HTTP status follows the gRPC status."""


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One channel, opened at start-up: gRPC multiplexes every request over it.
        app.state.client = OmniClient(settings)
        try:
            yield
        finally:
            await app.state.client.close()

    # No redirect for a trailing slash: a 307 with an empty body is no answer for an API client (404 instead).
    app = FastAPI(
        title="omni-grpc gateway", description=DESCRIPTION, version="1", lifespan=lifespan, redirect_slashes=False
    )
    app.state.settings = settings
    app.state.metrics = gateway_metrics = GatewayMetrics()
    install_error_handlers(app)
    for router in (chat.router, images.router, videos.router, models.router, health.router, metrics.router):
        app.include_router(router)
    app.include_router(adapters.router, include_in_schema=settings.enable_lora_admin)
    # The last added is the outermost: the access log sees the 413s and 415s too.
    app.add_middleware(RequireJson, form_paths=frozenset({videos.PATH}))
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(AccessLog, metrics=gateway_metrics)
    return app
