"""What routes get from the app: its one gRPC client and its settings."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.grpc_client import OmniClient
from gateway.settings import GatewaySettings


def get_client(request: Request) -> OmniClient:
    return request.app.state.client


def get_settings(request: Request) -> GatewaySettings:
    return request.app.state.settings


Client = Annotated[OmniClient, Depends(get_client)]
Settings = Annotated[GatewaySettings, Depends(get_settings)]
