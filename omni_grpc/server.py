"""Build and run the gRPC server: OmniService, health, reflection, signals and a graceful drain.

Health (grpc.health.v1) reports NOT_SERVING while the model loads, SERVING once it is ready, and
NOT_SERVING again as soon as shutdown begins. The port opens before the model loads, so orchestrators
can watch health from the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from omni_grpc.config import ServerConfig
from omni_grpc.engine.engine import Engine
from omni_grpc.errors import ModelLoadError
from omni_grpc.servicer import OmniServicer
from omni_grpc.v1 import omni_pb2, omni_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = omni_pb2.DESCRIPTOR.services_by_name["OmniService"].full_name


async def serve(config: ServerConfig, stop: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or `stop` is set). Returns the process exit code."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Not possible off the main thread (an embedding caller then sets `stop` itself).
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    engine = Engine(config.engine)
    executor = ThreadPoolExecutor(max_workers=config.max_concurrent_requests, thread_name_prefix="omni-rpc")
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
        ]
    )
    servicer = OmniServicer(engine, executor)
    omni_pb2_grpc.add_OmniServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    address = f"{config.host}:{config.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        log.error("cannot listen on %s: %s", address, exc)
        return 1
    await server.start()
    log.info("listening on %s:%d (health NOT_SERVING until the model is loaded)", config.host, port)

    loading = loop.run_in_executor(executor, engine.start)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if loading.done():
        try:
            loading.result()
        except ModelLoadError as exc:
            log.error("model load failed: %s", exc.message)
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
    log.info("stopped")
    return exit_code
