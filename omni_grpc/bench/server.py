"""Run the real gRPC server in this process (its own event loop thread) for a benchmark."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omni_grpc.config import ServerConfig
from omni_grpc.server import serve


@contextmanager
def running_server(config: ServerConfig, timeout: float = 300) -> Iterator[str]:
    """Yield the server's address once health reports SERVING; stop it on exit."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(loop.run_until_complete(serve(config, stop))))
    thread.start()
    target = f"{config.host}:{config.port}"
    channel = grpc.insecure_channel(target)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        end = time.monotonic() + timeout
        while True:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > end or not thread.is_alive():
                raise RuntimeError(f"benchmark server at {target} did not become ready")
            time.sleep(0.1)
        yield target
    finally:
        channel.close()
        loop.call_soon_threadsafe(stop.set)
        thread.join(120)
