"""Start-up, health transitions and graceful shutdown of the real server process."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from omni_grpc.config import EngineConfig, ServerConfig
from omni_grpc.engine.engine import Engine
from omni_grpc.loopback import free_port
from omni_grpc.service import server as server_module
from omni_grpc.v1 import omni_pb2 as pb
from omni_grpc.v1 import omni_pb2_grpc
from tests.helpers import REPO, listed, start_server, wait_for


def test_sigterm_finishes_running_requests_refuses_new_ones_and_exits_zero(
    cache_root: Path, preloaded: Path, tmp_path: Path
) -> None:
    srv = start_server(
        ["--cache-dir", str(cache_root), "--lora-path", f"pre={preloaded}", "--torch-threads", "1"],
        log_path=tmp_path / "s.log",
        process=True,
    )
    statuses: list[int] = []
    watch = health_pb2_grpc.HealthStub(srv.channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)

    def follow() -> None:
        with contextlib.suppress(grpc.RpcError):  # the stream ends with the server
            for update in watch:
                statuses.append(update.status)

    watcher = threading.Thread(target=follow)
    watcher.start()
    request = pb.GenerateRequest(
        prompt="p", lora_request=pb.LoraRequest(name="pre"), sampling_params=pb.SamplingParams(num_inference_steps=80)
    )
    # Under load: five requests in flight (some batched together, some queued) when SIGTERM arrives.
    running = [srv.stub.Generate.future(request, timeout=120) for _ in range(5)]
    wait_for(lambda: listed(srv)["pre"].in_use == 5)
    srv.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: health_pb2.HealthCheckResponse.NOT_SERVING in statuses)
    with pytest.raises(grpc.RpcError) as refused:
        srv.stub.Generate(pb.GenerateRequest(prompt="late"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [len(f.result().images) for f in running] == [1] * 5  # every admitted request finished normally
    assert srv.proc.wait(60) == 0
    watcher.join(10)
    assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
    assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    log = srv.log()
    assert "shutting down" in log and "stopped" in log
    assert "torch uses 1 CPU threads (--torch-threads)" in log
    srv.channel.close()


def test_hub_model_without_hub_exits_with_a_clear_error(tmp_path: Path) -> None:
    srv = start_server(["--model", "stabilityai/stable-diffusion-3.5-medium"], log_path=tmp_path / "s.log", wait=False)
    assert srv.proc.wait(120) == 1
    assert "local diffusers folder" in srv.log()


def test_health_is_not_serving_until_the_model_is_loaded(cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The port opens first; health flips to SERVING only once the (real) model is loaded."""
    release = threading.Event()

    class SlowStartEngine(Engine):
        def start(self) -> Engine:
            release.wait(60)
            return super().start()

    monkeypatch.setattr(server_module, "Engine", SlowStartEngine)
    port = free_port()
    config = ServerConfig(engine=EngineConfig(cache_dir=cache_root), port=port, grace_period=5)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(loop.run_until_complete(server_module.serve(config, stop))))
    thread.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    stub = omni_pb2_grpc.OmniServiceStub(channel)
    try:

        def status() -> int | None:
            try:
                return health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            except grpc.RpcError:
                return None

        wait_for(lambda: status() is not None)
        assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as early:
            stub.Generate(pb.GenerateRequest(prompt="too early"), timeout=10)
        assert early.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in early.value.details()
        release.set()
        wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING)
        assert stub.Generate(
            pb.GenerateRequest(prompt="now", sampling_params=pb.SamplingParams(num_inference_steps=1)), timeout=60
        ).images
    finally:
        release.set()
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        channel.close()
    assert codes == [0]


# The guide's "Call API with curl", character for character; the README must carry it unchanged.
GUIDE_CURL = r"""curl -X POST "${SERVER}/v1/chat/completions" \
  -H "Content-Type: application/json" \
  -d "{
    \"model\": \"stabilityai/stable-diffusion-3.5-medium\",
    \"messages\": [{\"role\": \"user\", \"content\": \"${PROMPT}\"}],
    \"lora_request\": {
      \"path\": \"${LORA_PATH}\",
      \"name\": \"${LORA_NAME}\",
      \"scale\": ${LORA_SCALE}
    },
    \"sampling_params\": {
      \"height\": 1024,
      \"width\": 1024,
      \"num_inference_steps\": 50
    }
  }"
"""


def readme_curl_block() -> str:
    """The README's first shell block after "the guide's curl command works as written"."""
    text = (REPO / "README.md").read_text()
    start = text.index("```bash\n", text.index("the guide's curl command"))
    return text[start + len("```bash\n") : text.index("```", start + 3)]


def test_the_readme_run_command_and_its_curl_block_work_as_written(cache_root: Path, tmp_path: Path) -> None:
    """`bash scripts/serve.sh` in an empty folder, then the README's curl block verbatim (only the port is
    this test's): the example adapter it names exists, both processes answer; SIGTERM stops both, exit 0."""
    block = readme_curl_block()
    assert GUIDE_CURL in block and "export LORA_PATH=$PWD/loras/lora_adapter" in block
    grpc_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "OMNI_GRPC_PORT": str(grpc_port),
        "OMNI_GATEWAY_PORT": str(http_port),
        # The venv running these tests, already installed by the README's test command.
        "OMNI_GRPC_VENV": str(Path(sys.executable).parent.parent),
    }
    # serve.sh's default adapter folder is ./loras of the checkout, the README's `$PWD/loras` when run from
    # there; here both are this test's folder.
    env["OMNI_LORA_DIRS"] = str(tmp_path / "loras")
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        ["bash", str(REPO / "scripts/serve.sh"), "--cache-dir", str(cache_root)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        url = f"http://127.0.0.1:{http_port}"
        for _ in range(600):
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        assert (tmp_path / "loras/lora_adapter/adapter_model.safetensors").is_file()
        assert shutil.which("curl"), "curl is needed to run the README's command"
        script = block.replace("localhost:8091", f"127.0.0.1:{http_port}")
        done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        body = json.loads(done.stdout)
        assert "error" not in body, body
        assert body["object"] == "chat.completion" and body["model"] == "omni-grpc/tiny-sd3"
        adapter = body["omni"]["adapter"]
        assert adapter["name"] == "my_lora" and adapter["path"] == str(tmp_path / "loras/lora_adapter"), adapter
        assert body["omni"]["num_inference_steps"] == 50
        png = base64.b64decode(body["choices"][0]["message"]["content"][0]["image_url"]["url"].split(",", 1)[1])
        with Image.open(io.BytesIO(png)) as image:
            assert image.size == (1024, 1024)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            info = omni_pb2_grpc.OmniServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        assert info.model == "omni-grpc/tiny-sd3" and info.default_height == 64 and info.spatial_multiple == 16
        assert (info.family, info.capabilities.guidance, info.capabilities.negative_prompt) == (
            "sd3",
            pb.GUIDANCE_KIND_CFG,
            True,
        )
        assert info.capabilities.output == pb.OUTPUT_KIND_IMAGE
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, (tmp_path / "serve.log").read_text()
