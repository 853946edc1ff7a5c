"""The gateway's one channel to the gRPC server, and the calls the routes make over it."""

from __future__ import annotations

from typing import Protocol, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omni_grpc.v1 import SERVICE_NAME, omni_pb2_grpc
from omni_grpc.v1 import omni_pb2 as pb
from omni_grpc_gateway.settings import GatewaySettings


class _HealthStub(Protocol):
    # types-grpcio-health-checking declares HealthStub without its methods.
    Check: grpc.aio.UnaryUnaryMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]


class OmniClient:
    """Thin async wrapper over the generated stub; errors surface as grpc.aio.AioRpcError."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings
        self._model_info: pb.GetServerInfoResponse | None = None
        limit = settings.max_message_bytes
        options = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # Retry a lost server at most a second apart (gRPC's default backoff grows to 2 minutes), so
            # the gateway sees a restarted server almost at once.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if settings.grpc_tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=settings.grpc_tls_ca.read_bytes())
            self._channel = grpc.aio.secure_channel(settings.grpc_target, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(settings.grpc_target, options=options)
        self._stub = omni_pb2_grpc.OmniServiceStub(self._channel)
        self._health = cast(_HealthStub, health_pb2_grpc.HealthStub(self._channel))

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, request: pb.GenerateRequest) -> pb.GenerateResponse:
        return await self._stub.Generate(request, timeout=self._settings.request_timeout)

    def generate_stream(
        self, request: pb.GenerateRequest, preview_every_steps: int = 0
    ) -> grpc.aio.UnaryStreamCall[pb.GenerateStreamRequest, pb.GenerateEvent]:
        """The streamed Generate: its events, the reply last. Cancel the call to stop the work."""
        message = pb.GenerateStreamRequest(request=request, preview_every_steps=preview_every_steps)
        return self._stub.GenerateStream(message, timeout=self._settings.request_timeout)

    async def server_info(self) -> pb.GetServerInfoResponse:
        return await self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self._settings.health_timeout * 5)

    async def model_info(self) -> pb.GetServerInfoResponse:
        """GetServerInfo, asked once: a server serves one model for its lifetime."""
        if self._model_info is None:
            self._model_info = await self.server_info()
        return self._model_info

    async def list_adapters(self, *, authorization: str | None = None) -> pb.ListAdaptersResponse:
        """The table; with an admin's Authorization header, adapters' server paths too."""
        return await self._stub.ListAdapters(
            pb.ListAdaptersRequest(), timeout=self._settings.health_timeout * 5, metadata=_auth_metadata(authorization)
        )

    async def load_adapter(
        self, request: pb.LoadAdapterRequest, *, authorization: str | None
    ) -> pb.LoadAdapterResponse:
        return await self._stub.LoadAdapter(
            request, timeout=self._settings.request_timeout, metadata=_auth_metadata(authorization)
        )

    async def unload_adapter(
        self, request: pb.UnloadAdapterRequest, *, authorization: str | None
    ) -> pb.UnloadAdapterResponse:
        return await self._stub.UnloadAdapter(
            request, timeout=self._settings.request_timeout, metadata=_auth_metadata(authorization)
        )

    async def serving(self) -> bool:
        """True only while the gRPC server's health service reports SERVING for OmniService."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=self._settings.health_timeout
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _auth_metadata(authorization: str | None) -> tuple[tuple[str, str], ...] | None:
    """The caller's own Authorization header, passed through: the gRPC server decides, not the gateway."""
    return (("authorization", authorization),) if authorization else None
