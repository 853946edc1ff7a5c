"""Settings of one gateway process, filled from `omni-grpc gateway` flags or by Python callers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GatewaySettings:
    # Where the gateway itself listens (uvicorn).
    host: str = "127.0.0.1"
    port: int = 8091
    # Where the gRPC server listens.
    grpc_target: str = "localhost:50051"
    # Seconds a generation may take end to end; passed to the gRPC call as its deadline (then 504).
    request_timeout: float = 600.0
    # The admin routes (/v1/load_lora_adapter, /v1/unload_lora_adapter) answer 404 unless enabled.
    enable_lora_admin: bool = False
    # Largest gRPC reply accepted (the images of a big request exceed gRPC's 4 MiB default).
    max_message_bytes: int = 64 * 1024 * 1024
    # Largest HTTP request body; beyond, 413 before anything is parsed.
    max_body_bytes: int = 1024 * 1024
    # Seconds a request's headers and body may take to arrive (then 408 and the connection closes): a client
    # that trickles bytes cannot hold a connection longer.
    request_read_timeout: float = 30.0
    # Open connections at once; beyond, a new one is answered 503 and closed.
    max_connections: int = 1000
    # Seconds /health waits for the gRPC health check.
    health_timeout: float = 2.0
    # PEM root certificate(s) that sign the gRPC server's certificate: the channel then uses TLS.
    grpc_tls_ca: Path | None = None
