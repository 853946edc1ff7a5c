"""What routes get from the app: its one gRPC client and its settings."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from omni_grpc_gateway.grpc_client import OmniClient
from omni_grpc_gateway.settings import GatewaySettings


def get_client(request: Request) -> OmniClient:
    client: OmniClient = request.app.state.client
    return client


def get_settings(request: Request) -> GatewaySettings:
    settings: GatewaySettings = request.app.state.settings
    return settings


Client = Annotated[OmniClient, Depends(get_client)]
Settings = Annotated[GatewaySettings, Depends(get_settings)]
