"""`omni-grpc gateway` (or `omni-grpc-gateway` where only the gateway is installed): flags, then uvicorn
serving the app."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from omni_grpc.shared.logs import add_logging_flags, add_version_flag, configure_logging
from omni_grpc_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    defaults = GatewaySettings()
    parser.add_argument("--host", default=defaults.host, help="address to bind (0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=defaults.port, help="HTTP port")
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
    parser.add_argument(
        "--request-read-timeout",
        type=float,
        default=defaults.request_read_timeout,
        help="seconds a request's headers and body may take to arrive; then 408 and the connection closes",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        help="open connections at once; beyond, new ones are answered 503",
    )
    add_logging_flags(parser)


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    return GatewaySettings(
        host=args.host,
        port=args.port,
        grpc_target=args.grpc_target,
        request_timeout=args.request_timeout,
        enable_lora_admin=args.enable_lora_admin,
        max_body_bytes=args.max_body_bytes,
        request_read_timeout=args.request_read_timeout,
        max_connections=args.max_connections,
        grpc_tls_ca=args.grpc_tls_ca,
    )


def uvicorn_config(settings: GatewaySettings, *, log_level: str = "info", own_logging: bool = True) -> Any:
    """uvicorn serving the app with `settings`: the one place its server options are chosen.

    `own_logging` False leaves the process's logging configuration alone (a gateway run inside tests).
    """
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from omni_grpc_gateway.app import create_app
    from omni_grpc_gateway.http_protocol import guarded_protocol

    # Our AccessLog writes the one line per request; uvicorn's own access log would double it.
    return uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        log_config=LOGGING_CONFIG if own_logging else None,
        access_log=False,
        http=guarded_protocol(settings.request_read_timeout, settings.max_connections),
        timeout_graceful_shutdown=int(settings.request_timeout),
    )


def run(args: argparse.Namespace) -> int:
    # Imported here so that building the `omni-grpc` parser stays light for the other commands.
    import uvicorn

    settings = settings_from_args(args)
    log.info(
        "gateway on http://%s:%d -> grpc%s %s (admin routes %s)",
        settings.host,
        settings.port,
        "+tls" if settings.grpc_tls_ca else "",
        settings.grpc_target,
        "on" if settings.enable_lora_admin else "off",
    )
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler it found installed.
    # A no-op handler here makes a graceful stop exit 0, as the gRPC server does.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    # uvicorn's own lines go through the handler configure_logging installed (JSON included).
    uvicorn.Server(uvicorn_config(settings, log_level=args.log_level.lower(), own_logging=False)).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `omni-grpc-gateway` command of the gateway-only install."""
    parser = argparse.ArgumentParser(prog="omni-grpc-gateway", description="OpenAI-style REST gateway for omni-grpc")
    add_gateway_flags(parser)
    add_version_flag(parser, "omni-grpc-gateway")
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
