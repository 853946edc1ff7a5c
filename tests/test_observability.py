"""What operators watch: Prometheus metrics of both processes (scraped over HTTP, parsed with prometheus-client's
own parser: exact changes after a known sequence of requests, errors, loads, hits and evictions; bounded labels;
the port rules), JSON logs with the request line's fields, versions, and the liveness and readiness probes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from omni_grpc.loopback import free_port, health_status, wait_serving
from omni_grpc.v1 import omni_pb2 as pb
from tests.helpers import InProcessGateway, InProcessServer, start_gateway, start_server, write_adapter

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    reply = httpx.get(url, timeout=30)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("metric-loras")
    return write_adapter(root / "alpha", seed=1), write_adapter(root / "beta", seed=2)


@pytest.fixture(scope="module")
def metered(
    cache_root: Path, adapters: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[InProcessServer, str]]:
    """A server with one adapter on the device and none in host memory: every switch is a read and an eviction."""
    port = free_port()
    srv = start_server(
        [
            "--cache-dir",
            str(cache_root),
            "--metrics-port",
            str(port),
            "--max-device-adapters",
            "1",
            "--max-host-adapters",
            "0",
            "--lora-dirs",
            str(adapters[0].parent),
        ],
        log_path=tmp_path_factory.mktemp("logs") / "metered.log",
    )
    yield srv, f"http://127.0.0.1:{port}/metrics"
    srv.stop()


def generate(server: InProcessServer, adapter: Path | None = None, steps: int = 2) -> None:
    sampling = pb.SamplingParams(height=32, width=32, num_inference_steps=steps, seed=1)
    lora = pb.LoraRequest(path=str(adapter)) if adapter is not None else None
    server.stub.Generate(pb.GenerateRequest(prompt="metrics", sampling_params=sampling, lora_request=lora), timeout=60)


def test_a_known_sequence_moves_each_metric_exactly(
    metered: tuple[InProcessServer, str], adapters: tuple[Path, Path]
) -> None:
    server, url = metered
    alpha, beta = adapters
    before = scrape(url)
    generate(server, alpha)  # read (a load)
    generate(server, beta)  # read; alpha moves down to disk (an eviction)
    generate(server, alpha)  # read again from disk; beta moves down
    generate(server, alpha)  # on the device: a hit
    generate(server)
    with pytest.raises(grpc.RpcError) as refused:
        server.stub.Generate(
            pb.GenerateRequest(prompt="x", sampling_params=pb.SamplingParams(num_inference_steps=10_000)), timeout=30
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("omni_grpc_requests_total", outcome="OK") == 5
    assert delta("omni_grpc_requests_total", outcome="INVALID_ARGUMENT") == 1
    assert delta("omni_grpc_request_duration_seconds_count") == 6
    assert (
        delta("omni_grpc_request_queue_seconds_count") == 5 and delta("omni_grpc_request_inference_seconds_count") == 5
    )
    assert delta("omni_grpc_request_inference_seconds_sum") > 0
    # Five pipeline calls of one image each: all in the first bucket (le=1).
    assert delta("omni_grpc_batch_images_count") == 5 and delta("omni_grpc_batch_images_bucket", le="1.0") == 5
    assert delta("omni_grpc_adapter_loads_total") == 3
    assert delta("omni_grpc_adapter_evictions_total") == 2
    assert delta("omni_grpc_adapter_hits_total") == 1
    assert delta("omni_grpc_adapter_promotions_total") == 0
    assert (
        value(after, "omni_grpc_adapters", tier="device") == 1 and value(after, "omni_grpc_adapters", tier="disk") == 1
    )
    assert value(after, "omni_grpc_requests_running") == 0 and value(after, "omni_grpc_requests_waiting") == 0
    info = [labels for (name, labels) in after if name == "omni_grpc_lora_requests_info"]
    assert info == [(("max_lora", "1"), ("running_lora_adapters", ""), ("waiting_lora_adapters", ""))]
    # No series names an adapter, except the one info series.
    assert not [key for key in after if "alpha" in str(key) and key[0] != "omni_grpc_lora_requests_info"]


def test_running_requests_and_their_adapters_show_while_they_run(
    metered: tuple[InProcessServer, str], adapters: tuple[Path, Path]
) -> None:
    server, url = metered
    alpha, _ = adapters
    sampling = pb.SamplingParams(height=32, width=32, num_inference_steps=150, seed=1)
    call = server.stub.Generate.future(
        pb.GenerateRequest(prompt="long", sampling_params=sampling, lora_request=pb.LoraRequest(path=str(alpha))),
        timeout=120,
    )
    try:
        seen = None
        while seen is None and not call.done():
            samples = scrape(url)
            if value(samples, "omni_grpc_requests_running") == 1:
                seen = samples
        assert seen is not None, "the long request was never seen running"
        info = [dict(labels) for (name, labels) in seen if name == "omni_grpc_lora_requests_info"]
        assert info[0]["running_lora_adapters"] == "alpha" and info[0]["waiting_lora_adapters"] == ""
    finally:
        call.cancel()
    # Cancelled, it ends: nothing runs any more (the request's end is counted once its batch stops).
    end = time.monotonic() + 60
    while value(scrape(url), "omni_grpc_requests_running") != 0 and time.monotonic() < end:
        time.sleep(0.05)
    assert value(scrape(url), "omni_grpc_requests_running") == 0


def test_a_metrics_port_in_use_stops_the_server(cache_root: Path, tmp_path: Path) -> None:
    port = free_port()
    first = start_server(["--cache-dir", str(cache_root), "--metrics-port", str(port)], log_path=tmp_path / "a.log")
    try:
        second = start_server(
            ["--cache-dir", str(cache_root), "--metrics-port", str(port)],
            log_path=tmp_path / "b.log",
            process=True,
            wait=False,
        )
        assert second.proc.wait(120) == 1
        assert f"cannot serve metrics on 127.0.0.1:{port} (--metrics-port)" in second.log()
    finally:
        first.stop()


def test_the_gateway_counts_requests_by_route_and_status(server: InProcessServer, tmp_path: Path) -> None:
    gateway: InProcessGateway = start_gateway(server.target, [], log_path=tmp_path / "gateway.log")
    try:
        before = scrape(f"{gateway.url}/metrics")
        body = {"prompt": "metrics", "size": "32x32", "num_inference_steps": 2}
        assert gateway.post("/v1/images/generations", body).status_code == 200
        assert gateway.post("/v1/images/generations", {**body, "n": 0}).status_code == 400
        assert gateway.post("/v1/images/generations", {**body, "bogus": 1}).status_code == 400
        assert gateway.get("/v1/nothing/here/1").status_code == 404
        after = scrape(f"{gateway.url}/metrics")
    finally:
        gateway.stop()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = "/v1/images/generations"
    assert delta("omni_gateway_requests_total", route=route, status="200") == 1
    assert delta("omni_gateway_requests_total", route=route, status="400") == 2
    assert delta("omni_gateway_requests_total", route="unmatched", status="404") == 1
    assert delta("omni_gateway_request_duration_seconds_count", route=route) == 3
    # Routes are templates, never raw paths.
    assert not [key for key in after if "/v1/nothing" in str(key)]


# ---- logs, versions and probes ------------------------------------------------------------------------------


def test_every_command_says_its_version() -> None:
    from importlib import metadata

    version = metadata.version("omni-grpc")
    for command in ([], ["serve"], ["gateway"], ["bench"], ["soak"], ["example-adapter"]):
        done = subprocess.run(
            [sys.executable, "-m", "omni_grpc", *command, "--version"], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0 and done.stdout.split() == ["omni-grpc", *command, version], (command, done)
    done = subprocess.run(
        [sys.executable, "-m", "omni_grpc_gateway.cli", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip().startswith("omni-grpc-gateway "), done


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_json_logs_carry_the_request_lines_fields(cache_root: Path, tmp_path: Path) -> None:
    srv = start_server(
        ["--cache-dir", str(cache_root), "--log-format", "json"], log_path=tmp_path / "server.log", process=True
    )
    gateway = start_gateway(srv.target, ["--log-format", "json"], log_path=tmp_path / "gateway.log", process=True)
    try:
        generate(srv)
        body = {"prompt": "json", "size": "32x32", "num_inference_steps": 2, "seed": 4}
        assert gateway.post("/v1/images/generations", body).status_code == 200
    finally:
        gateway.stop()
        srv.stop()
    server_lines = json_lines(srv.log())
    assert server_lines and all({"time", "level", "logger", "message"} <= set(line) for line in server_lines)
    requests = [line for line in server_lines if line["logger"] == "omni_grpc.requests"]
    assert len(requests) == 2
    first = requests[0]
    assert (first["outcome"], first["size"], first["steps"], first["steps_done"], first["adapter"]) == (
        "OK",
        "32x32",
        2,
        2,
        "-",
    )
    assert str(first["message"]).startswith(f"generate id={first['id']} adapter=- size=32x32 steps=2")
    access = [line for line in json_lines(gateway.log()) if line["logger"] == "omni_grpc_gateway.access"]
    # The harness's own GET /openapi.json (it waits for the port), then the request.
    assert [(line["method"], line["route"], line["status"]) for line in access] == [
        ("GET", "/openapi.json", 200),
        ("POST", "/v1/images/generations", 200),
    ]


def test_liveness_serves_while_the_model_loads(cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Readiness waits for the model; liveness does not (a load that takes minutes must not be killed)."""
    from omni_grpc.cli import build_parser, server_config_from_args
    from omni_grpc.engine.engine import Engine
    from omni_grpc.service.server import LIVENESS_SERVICE, serve

    loading = threading.Event()
    original = Engine.start

    def slow_start(engine: Engine) -> Engine:
        loading.wait(60)  # the model's load, held until the probes have been asked
        return original(engine)

    monkeypatch.setattr(Engine, "start", slow_start)
    port = free_port()
    config = server_config_from_args(
        build_parser().parse_args(["serve", "--port", str(port), "--metrics-port", "0", "--cache-dir", str(cache_root)])
    )
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=lambda: loop.run_until_complete(serve(config, stop)))
    thread.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        end = time.monotonic() + 60
        while True:
            try:
                live = health_status(channel, LIVENESS_SERVICE)
                break
            except grpc.RpcError:
                assert time.monotonic() < end, "the port never opened"
                time.sleep(0.05)
        assert live == serving
        assert health_status(channel, "") == not_serving
        assert health_status(channel, "omni_grpc.v1.OmniService") == not_serving
        loading.set()
        wait_serving(channel, timeout=120)
        assert health_status(channel, LIVENESS_SERVICE) == serving
    finally:
        loading.set()
        channel.close()
        loop.call_soon_threadsafe(stop.set)
        thread.join(120)
        loop.close()
