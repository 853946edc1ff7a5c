"""Start the real gateway (`python -m omni_grpc gateway`, uvicorn) on a free loopback port, and stop it."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.server_process import free_port, spawn_omni, stop_process


@dataclass
class GatewayProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def post(self, path: str, body: object, **kwargs: object) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=300, **kwargs)  # type: ignore[arg-type]

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=60)

    def wait_listening(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            try:
                httpx.get(f"{self.url}/openapi.json", timeout=2)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"gateway not listening after {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 30) -> int:
        return stop_process(self.proc, timeout)


def start_gateway(grpc_target: str, args: list[str], *, log_path: Path) -> GatewayProcess:
    port = free_port()
    proc = spawn_omni(["gateway", "--port", str(port), "--grpc-target", grpc_target, *args], log_path=log_path)
    gateway = GatewayProcess(proc=proc, port=port, log_path=log_path)
    gateway.wait_listening()
    return gateway
