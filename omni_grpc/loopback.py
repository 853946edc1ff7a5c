"""Real servers on loopback for the benchmark, the soak and the tests: a free port, `omni-grpc` started as
a process of this checkout (or the server in this process), waited for until health says SERVING, and
stopped with SIGTERM, then SIGKILL if it does not drain in time."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

if TYPE_CHECKING:
    from omni_grpc.config import ServerConfig

# The checkout this module runs from: servers started from here run the same code.
CHECKOUT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn_omni(
    command: list[str], *, log_path: Path, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`python -m omni_grpc COMMAND...` from this checkout, stdout and stderr into `log_path`."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    paths = [str(CHECKOUT), str(CHECKOUT / "gateway"), environment.get("PYTHONPATH", "")]
    environment["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    with log_path.open("w") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "omni_grpc", *command],
            cwd=cwd or CHECKOUT,
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


class _HealthStub(Protocol):
    # types-grpcio-health-checking declares HealthStub without its methods.
    Check: grpc.UnaryUnaryMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]


def health_status(channel: grpc.Channel, service: str = "", timeout: float = 5) -> int:
    """The health service's status for `service` ("" is the server as a whole)."""
    stub = cast(_HealthStub, health_pb2_grpc.HealthStub(channel))
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status)


def wait_serving(
    channel: grpc.Channel, *, timeout: float = 300, alive: Callable[[], bool] | None = None, what: str = "server"
) -> None:
    """Poll health until SERVING; RuntimeError after `timeout` seconds, or once `alive()` says False."""
    end = time.monotonic() + timeout
    while True:
        if alive is not None and not alive():
            raise RuntimeError(f"the {what} exited before it was ready")
        try:
            if health_status(channel, timeout=2) == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > end:
            raise RuntimeError(f"the {what} was not SERVING after {timeout:.0f} s")
        time.sleep(0.1)


def wait_replicas(
    channel: grpc.Channel, at_least: int, *, timeout: float = 600, alive: Callable[[], bool] | None = None
) -> int:
    """Poll a cluster's GetServerInfo until at least `at_least` replicas answer; how many do. RuntimeError after
    `timeout` seconds, or once `alive()` says False."""
    from omni_grpc.v1 import omni_pb2 as pb
    from omni_grpc.v1 import omni_pb2_grpc

    stub = omni_pb2_grpc.OmniServiceStub(channel)
    end = time.monotonic() + timeout
    while True:
        if alive is not None and not alive():
            raise RuntimeError("the cluster exited before it was ready")
        try:
            count = len(stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5).replicas)
            if count >= at_least:
                return count
        except grpc.RpcError:
            pass
        if time.monotonic() > end:
            raise RuntimeError(f"the cluster had fewer than {at_least} replicas after {timeout:.0f} s")
        time.sleep(0.5)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
    """SIGTERM, then SIGKILL after `timeout` seconds; the exit code (negative: killed by a signal)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class LoopbackServer:
    """A server started by `running_server`: its address, and once stopped, its exit code."""

    target: str
    exit_code: int | None = None


@contextmanager
def running_server(config: ServerConfig, timeout: float = 300, tls_ca: Path | None = None) -> Iterator[LoopbackServer]:
    """The real gRPC server in this process (its own event loop thread), once health reports SERVING; on
    exit it is drained and stopped. `config.port` 0 is replaced by a free port; `tls_ca` is the root
    certificate to reach a TLS server with."""
    import dataclasses

    from omni_grpc.service.server import serve

    if config.port == 0:
        config = dataclasses.replace(config, port=free_port())
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    server = LoopbackServer(f"{config.host}:{config.port}")

    def run() -> None:
        server.exit_code = loop.run_until_complete(serve(config, stop))

    thread = threading.Thread(target=run, name="omni-server")
    thread.start()
    target = server.target
    if tls_ca is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes()))
    try:
        wait_serving(channel, timeout=timeout, alive=thread.is_alive, what=f"server at {target}")
        yield server
    finally:
        channel.close()
        loop.call_soon_threadsafe(stop.set)
        thread.join(120)
        loop.close()
