"""`omni-grpc gateway`: flags, then uvicorn serving the app."""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    defaults = GatewaySettings()
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=8091, help="HTTP port")
    parser.add_argument("--grpc-target", default=defaults.grpc_target, help="host:port of the gRPC server")
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=defaults.request_timeout,
        help="seconds a request may take; then 504 and the generation is cancelled",
    )
    parser.add_argument(
        "--enable-lora-admin",
        action="store_true",
        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (off: they answer 404)",
    )
    parser.add_argument(
        "--grpc-tls-ca",
        type=Path,
        default=None,
        help="PEM root certificate of the gRPC server's TLS certificate: connect with TLS",
    )
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, help="largest request body")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run(args: argparse.Namespace) -> int:
    # Imported here so that building the `omni-grpc` parser stays light for the other commands.
    import uvicorn

    from gateway.app import create_app

    settings = GatewaySettings(
        grpc_target=args.grpc_target,
        request_timeout=args.request_timeout,
        enable_lora_admin=args.enable_lora_admin,
        max_body_bytes=args.max_body_bytes,
        grpc_tls_ca=args.grpc_tls_ca,
    )
    log.info(
        "gateway on http://%s:%d -> grpc%s %s (admin routes %s)",
        args.host,
        args.port,
        "+tls" if settings.grpc_tls_ca else "",
        settings.grpc_target,
        "on" if settings.enable_lora_admin else "off",
    )
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler it found installed.
    # A no-op handler here makes a graceful stop exit 0, as the gRPC server does.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    # Our AccessLog writes the one line per request; uvicorn's own access log would double it.
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=int(settings.request_timeout),
    )
    return 0
