"""What the test modules share: real servers and gateways on loopback ports, and small gRPC and engine helpers.

Servers run in this process (`omni_grpc.loopback.running_server`, configured from the same flags as
`omni-grpc serve`) unless a test needs the process itself (signals, exit codes, what it imports); then
`omni-grpc serve` runs as a child process. Gateways likewise: uvicorn in a thread, or `omni-grpc gateway`.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import grpc
import httpx
import numpy as np
import pytest

from omni_grpc.bench.fixtures import write_adapter as write_bench_adapter
from omni_grpc.engine.engine import Engine
from omni_grpc.engine.types import GenerateRequest, GenerateResult, LoraRequest
from omni_grpc.loopback import CHECKOUT, free_port, health_status, spawn_omni, stop_process, wait_serving
from omni_grpc.tiny_models.sd3 import TinySD3Spec
from omni_grpc.v1 import omni_pb2 as pb
from omni_grpc.v1 import omni_pb2_grpc

REPO = CHECKOUT
PROMPT = "a piece of cheesecake"
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# ---- servers ------------------------------------------------------------------------------------------------


class Server(Protocol):
    target: str
    channel: grpc.Channel
    stub: omni_pb2_grpc.OmniServiceStub

    def log(self) -> str: ...

    def stop(self) -> int: ...


def _channel(target: str, tls_ca: Path | None) -> grpc.Channel:
    if tls_ca is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes()))


class ServerProcess:
    """`omni-grpc serve` as a child process."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path, tls_ca: Path | None) -> None:
        self.proc = proc
        self.port = port
        self.target = f"127.0.0.1:{port}"
        self.log_path = log_path
        self.channel = _channel(self.target, tls_ca)
        self.stub = omni_pb2_grpc.OmniServiceStub(self.channel)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health_status(self, service: str = "") -> int:
        return health_status(self.channel, service)

    def wait_serving(self, timeout: float = 180) -> None:
        try:
            wait_serving(self.channel, timeout=timeout, alive=lambda: self.proc.poll() is None)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{self.log()}") from None

    def stop(self, timeout: float = 60) -> int:
        self.channel.close()
        return stop_process(self.proc, timeout)


class _LogFile:
    """The records of some loggers of this process, written to a file as `omni-grpc` formats them."""

    def __init__(self, path: Path, *loggers: str) -> None:
        self.path = path
        self._handler = logging.FileHandler(path)
        self._handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        self._loggers = [logging.getLogger(name) for name in loggers]
        for logger in self._loggers:
            logger.setLevel(logging.INFO)
            logger.addHandler(self._handler)

    def read(self) -> str:
        self._handler.flush()
        return self.path.read_text(errors="replace")

    def close(self) -> None:
        for logger in self._loggers:
            logger.removeHandler(self._handler)
        self._handler.close()


class InProcessServer:
    """The real gRPC server, configured from `omni-grpc serve` flags, on a thread of this process.

    Its log holds every omni_grpc record written while it runs (another in-process server's included).
    """

    def __init__(self, args: list[str], log_path: Path, tls_ca: Path | None, port: int | None = None) -> None:
        from omni_grpc.cli import build_parser, server_config_from_args
        from omni_grpc.loopback import running_server

        port = port or free_port()
        config = server_config_from_args(build_parser().parse_args(["serve", "--port", str(port), *args]))
        self.port = port
        self.target = f"127.0.0.1:{port}"
        self._log = _LogFile(log_path, "omni_grpc")
        self._stack = contextlib.ExitStack()
        try:
            self._running = self._stack.enter_context(running_server(config, tls_ca=tls_ca))
        except BaseException:
            self._log.close()
            raise
        self.channel = _channel(self.target, tls_ca)
        self.stub = omni_pb2_grpc.OmniServiceStub(self.channel)

    def log(self) -> str:
        return self._log.read()

    def health_status(self, service: str = "") -> int:
        return health_status(self.channel, service)

    def stop(self) -> int:
        """Drain and stop it, as SIGTERM would; the exit code `omni-grpc serve` would have given."""
        self.channel.close()
        try:
            self._stack.close()
        finally:
            self._log.close()
        return -1 if self._running.exit_code is None else self._running.exit_code


def start_server(
    args: list[str],
    *,
    log_path: Path,
    process: bool = False,
    wait: bool = True,
    port: int | None = None,
    env: dict[str, str] | None = None,
    tls_ca: Path | None = None,
) -> Any:
    """A server with these `omni-grpc serve` flags: in this process unless `process` (or an environment or
    no wait is asked for, which only a process can give). Without metrics unless `args` give a port: tests
    start many servers at once. Batches take every queued request that fits unless `args` say otherwise: the
    tests check what shares a batch, and the learned policy (tests/test_batch_sizer.py) may choose less."""
    if not any(arg.startswith("--metrics-port") for arg in args):
        args = ["--metrics-port", "0", *args]
    if not any(arg.startswith("--batch-policy") for arg in args):
        args = ["--batch-policy", "fill", *args]
    if not process and env is None and wait:
        return InProcessServer(args, log_path, tls_ca, port)
    port = port or free_port()
    command = ["serve", "--host", "127.0.0.1", "--port", str(port), *args]
    server = ServerProcess(spawn_omni(command, log_path=log_path, env=env), port, log_path, tls_ca)
    if wait:
        server.wait_serving()
    return server


# ---- gateways -----------------------------------------------------------------------------------------------


class _Http:
    url: str

    def post(self, path: str, body: object, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=300, **kwargs)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=60)


class GatewayProcess(_Http):
    """`omni-grpc gateway` as a child process."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

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


class InProcessGateway(_Http):
    """The gateway app under uvicorn, configured from `omni-grpc gateway` flags, on a thread of this process."""

    def __init__(self, grpc_target: str, args: list[str], log_path: Path) -> None:
        import argparse

        import uvicorn
        from omni_grpc_gateway.cli import add_gateway_flags, settings_from_args, uvicorn_config

        parser = argparse.ArgumentParser()
        add_gateway_flags(parser)
        self.port = free_port()
        flags = parser.parse_args(["--port", str(self.port), "--grpc-target", grpc_target, *args])
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = _LogFile(log_path, "omni_grpc_gateway")
        self._server = uvicorn.Server(uvicorn_config(settings_from_args(flags), own_logging=False))
        self._thread = threading.Thread(target=self._server.run, name="gateway", daemon=True)
        self._thread.start()
        end = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                self._log.close()
                raise RuntimeError(f"in-process gateway did not start:\n{self._log.read()}")
            time.sleep(0.02)

    def log(self) -> str:
        return self._log.read()

    def stop(self) -> int:
        self._server.should_exit = True
        self._thread.join(60)
        self._log.close()
        return 0 if not self._thread.is_alive() else 1


def start_gateway(grpc_target: str, args: list[str], *, log_path: Path, process: bool = False) -> Any:
    """A gateway with these `omni-grpc gateway` flags, in front of `grpc_target`."""
    if not process:
        return InProcessGateway(grpc_target, args, log_path)
    port = free_port()
    proc = spawn_omni(["gateway", "--port", str(port), "--grpc-target", grpc_target, *args], log_path=log_path)
    gateway = GatewayProcess(proc, port, log_path)
    gateway.wait_listening()
    return gateway


# ---- gRPC calls ---------------------------------------------------------------------------------------------


def rpc_error(call: Callable[..., object], *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def field_violation(error: grpc.RpcError) -> str | None:
    """The field an INVALID_ARGUMENT's google.rpc.BadRequest detail names."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return str(bad.field_violations[0].field)
    return None


def load(server: Server, path: str | Path, **kwargs: Any) -> pb.LoadAdapterResponse:
    return server.stub.LoadAdapter(pb.LoadAdapterRequest(path=str(path), **kwargs), timeout=60)


def listed(server: Server) -> dict[str, pb.Adapter]:
    return {a.name: a for a in server.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=10).adapters}


def unload(server: Server, **selector: Any) -> pb.UnloadAdapterResponse:
    return server.stub.UnloadAdapter(pb.UnloadAdapterRequest(**selector), timeout=60)


def wait_for(predicate: Callable[[], object], timeout: float = 60.0) -> None:
    """Poll a condition (not a timing assertion: the bound only stops a broken build from hanging)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def request_lines(log: str, since: int, needle: str) -> list[str]:
    """The request log lines written after character `since` of a log that mention `needle`."""
    return [line for line in log[since:].splitlines() if "omni_grpc.requests: generate" in line and needle in line]


def log_field(line: str, name: str) -> str:
    """The value of `name=` in a log line."""
    return next(part.split("=", 1)[1] for part in line.split() if part.startswith(f"{name}="))


# ---- adapters -----------------------------------------------------------------------------------------------


def write_adapter(folder: Path, seed: int, rank: int = 2) -> Path:
    """A small PEFT-format adapter for the default model (to_q and to_v of every block)."""
    return write_bench_adapter(
        folder, TinySD3Spec(), rank=rank, seed=seed, magnitude=0.3, targets=("to_q", "to_v"), alpha=rank
    )


# ---- the engine, directly -----------------------------------------------------------------------------------


def held_worker(engine: Engine) -> threading.Event:
    """Occupy the worker so that the requests submitted next queue up and meet in one batch."""
    release, running = threading.Event(), threading.Event()

    def hold() -> None:
        running.set()
        release.wait()

    engine._worker.submit(hold)
    running.wait()
    return release


def wait_queued(engine: Engine, count: int) -> None:
    """Wait until `count` jobs wait for the worker."""
    wait_for(lambda: engine._worker.queued >= count)


def run_together(engine: Engine, requests: list[GenerateRequest], **kwargs: Any) -> list[Future[GenerateResult]]:
    """Submit the requests while the worker is held, so that they meet in the queue; then let it go."""
    release = held_worker(engine)
    pool = ThreadPoolExecutor(len(requests))
    futures = [pool.submit(engine.generate, r, **kwargs) for r in requests]
    wait_queued(engine, len(requests))
    release.set()
    pool.shutdown(wait=False)
    return futures


@contextlib.contextmanager
def started_engine(**config: Any) -> Iterator[Engine]:
    """An engine with this config; batches take every queued request that fits, as `start_server`'s do."""
    from omni_grpc.config import EngineConfig

    engine = Engine(EngineConfig(**{"batch_policy": "fill", **config})).start()
    try:
        yield engine
    finally:
        engine.close()


def base_unchanged_by_adapters(
    model_dir: Path, adapter: Path, generate: Callable[[Engine, LoraRequest | None], Any]
) -> Any:
    """On a fresh engine: the base output (no adapter) before any adapter is loaded, and again after `adapter`
    was used and loaded; returns the first, asserting the second is bit for bit the same."""
    with started_engine(model=str(model_dir), allow_any_lora_path=True, dtype="float32") as engine:
        before = generate(engine, None)
        generate(engine, LoraRequest(path=str(adapter)))
        engine.load_adapter(str(adapter))
        assert np.array_equal(generate(engine, None), before)
    return before
