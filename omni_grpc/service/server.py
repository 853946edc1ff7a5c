"""Build and run the gRPC server: OmniService, health, reflection, signals and a graceful drain.

Health (grpc.health.v1) reports NOT_SERVING while the model loads, SERVING once it is ready, and
NOT_SERVING again as soon as shutdown begins (readiness: the service "" and omni_grpc.v1.OmniService). The
service "liveness" is SERVING from the moment the port opens, the model's load included, until shutdown: a
liveness probe that never kills a server for loading a big model. The port opens before the model loads, so
orchestrators can watch health from the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from omni_grpc.config import ServerConfig
from omni_grpc.engine.engine import Engine
from omni_grpc.errors import ModelLoadError, OmniError
from omni_grpc.quoting import loggable
from omni_grpc.service.auth import ADMIN_METHODS, AdminToken, AdminTokenInterceptor
from omni_grpc.service.metrics import ServerMetrics
from omni_grpc.service.servicer import OmniServicer
from omni_grpc.v1 import SERVICE_NAME, omni_pb2_grpc

log = logging.getLogger(__name__)
# The health service that answers SERVING while the process is alive (loading included).
LIVENESS_SERVICE = "liveness"


async def serve(config: ServerConfig, stop: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or `stop` is set). Returns the process exit code."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Not possible off the main thread (an embedding caller then sets `stop` itself).
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    # With an admin token only admins decide which adapters stay: requests cannot evict theirs.
    engine = Engine(dataclasses.replace(config.engine, reserve_admin_adapters=bool(config.admin_token)))
    # A thread per waiting or running request, plus some for admin calls: the queue bound (--max-queue),
    # not the thread pool, decides when a request is refused.
    cfg = config.engine
    threads = (cfg.max_queue or 256) + cfg.max_batch_size + 16
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="omni-rpc")
    token = AdminToken(config.admin_token)
    interceptors = []
    if token.required:
        admin = [f"/{SERVICE_NAME}/{method}" for method in ADMIN_METHODS]
        interceptors.append(AdminTokenInterceptor(token, admin))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            # grpcio shares a port between processes by default (SO_REUSEPORT): a second server would then
            # start "fine" and take half the connections with another adapter table. Binding must fail instead.
            ("grpc.so_reuseport", 0),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # The servicer refuses requests over max_request_bytes by name; this is gRPC's hard wall.
            ("grpc.max_receive_message_length", 4 * config.max_request_bytes),
        ],
    )
    servicer = OmniServicer(engine, executor, token, max_request_bytes=config.max_request_bytes)
    omni_pb2_grpc.add_OmniServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    metrics = ServerMetrics(engine)

    address = f"{config.host}:{config.port}"
    try:
        if config.tls_cert is not None and config.tls_key is not None:
            credentials = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except (RuntimeError, OSError) as exc:
        log.error("cannot listen on %s (is another server using the port?): %s", address, exc)
        return 1
    metrics_server = None
    if config.metrics_port:
        try:
            metrics_server = metrics.serve(config.host, config.metrics_port)
        except OSError as exc:
            log.error("cannot serve metrics on %s:%d (--metrics-port): %s", config.host, config.metrics_port, exc)
            return 1
        log.info("metrics on http://%s:%d/metrics", config.host, config.metrics_port)
    await server.start()
    await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    _log_security(config)
    log.info(
        "listening on %s:%d%s (health NOT_SERVING until the model is loaded)",
        config.host,
        port,
        " with TLS" if config.tls_cert else "",
    )

    loading = loop.run_in_executor(executor, engine.start)
    stopping = asyncio.ensure_future(stop.wait())
    first: list[asyncio.Future[Any]] = [loading, stopping]
    await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if loading.done():
        try:
            loading.result()
        except ModelLoadError as exc:
            log.error("model load failed: %s", loggable(exc.message, limit=2000))
            exit_code = 1
        except OmniError as exc:  # a --lora-path adapter that cannot be loaded
            log.error("start-up failed: %s", loggable(exc.message, limit=2000))
            exit_code = 1
        except Exception:
            log.exception("start-up failed")
            exit_code = 1
        else:
            for name in ("", SERVICE_NAME):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            log.info("ready: health SERVING on port %d", port)
            await stopping
    stopping.cancel()

    log.info(
        "shutting down: health NOT_SERVING, new requests refused, %.0fs grace for running ones", config.grace_period
    )
    servicer.stop_accepting()
    await health_servicer.enter_graceful_shutdown()
    stopping_server = asyncio.ensure_future(server.stop(config.grace_period))
    if not await servicer.wait_idle(config.grace_period):
        log.warning("grace period over: cancelling the requests still running")
    # Health watches never end by themselves; once our own calls are done, close everything now.
    await server.stop(0)
    await stopping_server
    if loading.done():
        await asyncio.get_running_loop().run_in_executor(None, engine.close)
    executor.shutdown(wait=False, cancel_futures=True)
    if metrics_server is not None:
        metrics_server.shutdown()
    log.info("stopped")
    return exit_code


def _log_security(config: ServerConfig) -> None:
    """Say at start-up who may load what: an operator should never have to guess."""
    engine = config.engine
    if engine.allow_any_lora_path:
        log.warning(
            "--allow-any-lora-path: clients may load adapter files from ANY path this process can read; "
            "use this only on a trusted single-user machine"
        )
    elif engine.lora_dirs:
        log.info("clients may load adapters by path from: %s", ", ".join(engine.lora_dirs))
    else:
        log.info("adapters by path are off (no --lora-dirs): requests use pre-loaded adapters by name or id")
    if not config.admin_token:
        log.warning("no --admin-token: LoadAdapter and UnloadAdapter are open to every client")
