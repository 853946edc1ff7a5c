"""Start the real server (`python -m omni_grpc serve`) on a free loopback port, and stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omni_grpc.v1 import omni_pb2_grpc

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path
    channel: grpc.Channel = field(init=False)
    stub: omni_pb2_grpc.OmniServiceStub = field(init=False)

    tls_ca: Path | None = None

    def __post_init__(self) -> None:
        if self.tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=self.tls_ca.read_bytes())
            self.channel = grpc.secure_channel(f"127.0.0.1:{self.port}", credentials)
        else:
            self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = omni_pb2_grpc.OmniServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health_status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def wait_serving(self, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.health_status() == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not SERVING after {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 60) -> int:
        self.channel.close()
        return stop_process(self.proc, timeout)


def stop_process(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM, then SIGKILL after `timeout` seconds; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def spawn_omni(
    command: list[str], *, log_path: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`python -m omni_grpc COMMAND...` from this checkout, stdout and stderr into `log_path`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    log_file = log_path.open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "omni_grpc", *command],
        cwd=cwd or REPO,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )


def start_server(
    args: list[str],
    *,
    log_path: Path,
    cwd: Path | None = None,
    wait: bool = True,
    port: int | None = None,
    env: dict[str, str] | None = None,
    tls_ca: Path | None = None,
) -> ServerProcess:
    port = port or free_port()
    command = ["serve", "--host", "127.0.0.1", "--port", str(port), *args]
    proc = spawn_omni(command, log_path=log_path, cwd=cwd, env=env)
    server = ServerProcess(proc=proc, port=port, log_path=log_path, tls_ca=tls_ca)
    if wait:
        server.wait_serving()
    return server
