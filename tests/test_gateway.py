"""The REST gateway: real uvicorn in front of the real gRPC server on the embedded default model."""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from PIL import Image

from omni_grpc.loopback import free_port
from omni_grpc.v1 import omni_pb2 as pb
from omni_grpc.v1 import omni_pb2_grpc
from tests.helpers import REPO, Server, log_field, request_lines, start_gateway, start_server, wait_for
from tests.lora_factory import make_peft_adapter

# Every gateway here runs in this process; test_lifecycle.py runs `omni-grpc gateway` itself.
GatewayProcess = Any

PROMPT = "A piece of cheesecake"
SMALL = {"height": 64, "width": 64, "num_inference_steps": 3, "seed": 21}


def chat_body(**fields: object) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": PROMPT}], **fields}


def png_of_data_url(url: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return base64.b64decode(url[len(prefix) :])


def chat_images(response: httpx.Response) -> list[bytes]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int) and body["usage"]["total_tokens"] == 0
    return [png_of_data_url(part["image_url"]["url"]) for part in body["choices"][0]["message"]["content"]]


def direct_png(server: Server, lora: dict | None = None, **sampling: int | float) -> bytes:
    request = pb.GenerateRequest(prompt=PROMPT, sampling_params=pb.SamplingParams(**sampling))
    if lora:
        request.lora_request.CopyFrom(pb.LoraRequest(**lora))
    return server.stub.Generate(request, timeout=120).images[0].data


def assert_error(
    response: httpx.Response, status: int, *, code: str, param: str | None = None, words: str = ""
) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["param"] == param, error
    assert words in error["message"], error
    return error


@pytest.fixture(scope="module")
def client(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)


# --- generation ---------------------------------------------------------------------------------------------


def test_openai_chat_client_with_extra_body_equals_direct_grpc(
    client: openai.OpenAI, server: Server, style_a: Path
) -> None:
    response = client.chat.completions.create(
        model="omni-grpc/tiny-sd3",
        messages=[{"role": "user", "content": PROMPT}],
        extra_body={"lora": {"local_path": str(style_a), "scale": 0.5}, **SMALL},
    )
    assert response.model == "omni-grpc/tiny-sd3"
    parts = response.choices[0].message.content
    assert isinstance(parts, list) and len(parts) == 1 and parts[0]["type"] == "image_url"
    got = png_of_data_url(parts[0]["image_url"]["url"])
    assert response.model_extra["omni"]["adapter"]["name"] == "style_a"
    expected = direct_png(server, {"path": str(style_a), "scale": 0.5}, **SMALL)
    assert got == expected
    assert got != direct_png(server, None, **SMALL)


def test_both_body_shapes_and_both_endpoints_give_the_same_image(gateway: GatewayProcess, style_b: Path) -> None:
    nested = chat_body(
        lora_request={"path": str(style_b), "scale": 0.7},
        sampling_params={**SMALL, "guidance_scale": 3.0, "negative_prompt": "blur"},
    )
    flat = chat_body(
        lora={"lora_path": str(style_b), "lora_scale": 0.7},
        size="64x64",
        num_inference_steps=3,
        seed=21,
        guidance_scale=3.0,
        negative_prompt="blur",
    )
    images = {
        "prompt": PROMPT,
        "size": "64x64",
        "lora": {"path": str(style_b), "scale": 0.7},
        "num_inference_steps": 3,
        "seed": 21,
        "guidance_scale": 3.0,
        "negative_prompt": "blur",
    }
    first = chat_images(gateway.post("/v1/chat/completions", nested))
    assert chat_images(gateway.post("/v1/chat/completions", flat)) == first
    reply = gateway.post("/v1/images/generations", images)
    assert reply.status_code == 200, reply.text
    assert [base64.b64decode(d["b64_json"]) for d in reply.json()["data"]] == first


def test_text_parts_of_the_last_user_message_make_the_prompt(gateway: GatewayProcess, server: Server) -> None:
    body = {
        "messages": [
            {"role": "system", "content": "ignored"},
            {"role": "user", "content": "an earlier prompt"},
            {"role": "assistant", "content": "ignored"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "A piece"}, {"type": "text", "text": "of cheesecake"}],
            },
        ],
        **SMALL,
    }
    assert chat_images(gateway.post("/v1/chat/completions", body)) == [direct_png(server, None, **SMALL)]


def test_openai_images_client(client: openai.OpenAI) -> None:
    result = client.images.generate(
        prompt=PROMPT, n=2, size="64x64", response_format="b64_json", extra_body={"num_inference_steps": 2, "seed": 5}
    )
    assert len(result.data) == 2
    for item in result.data:
        with Image.open(io.BytesIO(base64.b64decode(item.b64_json))) as image:
            assert image.format == "PNG" and image.size == (64, 64)
    assert result.model_extra["omni"]["seeds"] == [5, 6]


def test_output_format_jpeg(gateway: GatewayProcess) -> None:
    reply = gateway.post("/v1/images/generations", {"prompt": PROMPT, "output_format": "jpeg", **SMALL})
    assert reply.status_code == 200, reply.text
    with Image.open(io.BytesIO(base64.b64decode(reply.json()["data"][0]["b64_json"]))) as image:
        assert image.format == "JPEG"


# --- models and health --------------------------------------------------------------------------------------


def test_models_lists_the_base_and_every_adapter(client: openai.OpenAI, server: Server) -> None:
    models = client.models.list().data
    assert models[0].id == "omni-grpc/tiny-sd3" and models[0].model_extra["parent"] is None
    adapters = {m.id: m for m in models[1:]}
    table = {a.name: a for a in server.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=10).adapters}
    assert set(adapters) == set(table) and "pre" in adapters
    assert all(m.model_extra["parent"] == "omni-grpc/tiny-sd3" for m in adapters.values())
    assert adapters["pre"].model_extra["root"] == table["pre"].path


def test_model_naming_an_adapter_runs_it(gateway: GatewayProcess, server: Server) -> None:
    got = chat_images(gateway.post("/v1/chat/completions", {**chat_body(**SMALL), "model": "pre"}))
    assert got == [direct_png(server, {"name": "pre"}, **SMALL)]


def test_health_follows_the_grpc_server(tmp_path: Path, cache_root: Path) -> None:
    port = free_port()
    gateway = start_gateway(f"127.0.0.1:{port}", [], log_path=tmp_path / "gateway.log")
    try:
        assert_error(gateway.get("/health"), 503, code="unavailable", words="not serving")
        down = gateway.post("/v1/chat/completions", chat_body())
        assert_error(down, 503, code="unavailable", words="gRPC server is unavailable")
        server = start_server(["--cache-dir", str(cache_root)], log_path=tmp_path / "server.log", port=port)
        try:
            # The channel retries the connection at most a second apart (grpc_client.py).
            deadline = time.monotonic() + 5
            while (reply := gateway.get("/health")).status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert reply.status_code == 200 and reply.json() == {"status": "serving"}
        finally:
            assert server.stop() == 0
        assert_error(gateway.get("/health"), 503, code="unavailable")
    finally:
        assert gateway.stop() == 0


def test_openapi_schema_describes_every_route_and_error(gateway: GatewayProcess) -> None:
    schema = gateway.get("/openapi.json").json()
    paths = schema["paths"]
    for route in ("/v1/chat/completions", "/v1/images/generations"):
        responses = paths[route]["post"]["responses"]
        assert {"200", "400", "404", "409", "422", "429", "503", "504"} <= set(responses)
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "get" in paths["/v1/models"] and "get" in paths["/health"]
    # Admin routes are off here, so they are not advertised.
    assert "/v1/load_lora_adapter" not in paths
    body = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"lora_request", "sampling_params", "lora", "size", "num_outputs_per_prompt"} <= set(body)


def test_the_gateway_does_not_import_torch() -> None:
    code = (
        "import sys, omni_grpc_gateway.app, omni_grpc_gateway.cli; omni_grpc_gateway.app.create_app(); "
        "assert 'torch' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"height": 72}, "height", "multiple of 16"),
        ({"sampling_params": {"height": 72}}, "sampling_params.height", "multiple of 16"),
        ({"size": "72x64"}, "size", "multiple of 16"),
        ({"num_outputs_per_prompt": 99}, "num_outputs_per_prompt", "between 1 and 8"),
        ({"sampling_params": {"num_images": 99}}, "sampling_params.num_images", "between 1 and 8"),
        ({"lora": {"name": "pre", "scale": 1000}}, "lora.scale", "between"),
        ({"lora_request": {"name": "pre", "scale": 1000}}, "lora_request.scale", "between"),
        ({"messages": [{"role": "user", "content": " "}]}, "messages", "prompt must not be empty"),
        # Refused by the gateway itself.
        ({"lora": {"name": "a", "lora_name": "b"}}, "lora", "lora has both name and lora_name"),
        ({"lora": {"scale": 1.0}}, "lora", "lora needs local_path"),
        ({"lora": "style_a"}, "lora", "valid dictionary"),
        ({"lora": {"local_path": "x", "rank": 4}}, "lora.rank", "Extra inputs"),
        ({"lora_request": {"scale": 0.5}}, "lora_request", "needs a path, a name or an id"),
        ({"lora_request": {"path": "x", "weight": 1}}, "lora_request.weight", "Extra inputs"),
        ({"lora_request": {"path": "x"}, "height": 64}, "height", "mixes the nested shape"),
        ({"sampling_params": {"seed": 1}, "lora": {"name": "pre"}}, "lora", "mixes"),
        ({"height": "tall"}, "height", "valid integer"),
        ({"height": -64}, "height", "greater than or equal to 0"),
        ({"seed": 2**64}, "seed", "less than or equal"),
        ({"size": "big"}, "size", 'size must look like "1024x1024"'),
        ({"size": "64x64", "height": 64}, "size", "either size or height/width"),
        ({"sampling_params": {"steps": 4}}, "sampling_params.steps", "Extra inputs"),
        ({"lorra_request": {}}, "lorra_request", "Extra inputs"),
        ({"partial_images": 1}, "partial_images", "partial_images goes with stream: true"),
        ({"n": 2}, "n", "num_outputs_per_prompt"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", "no user message"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content.0",
            "only text parts",
        ),
        ({"output_format": "gif"}, "output_format", "'png', 'jpeg' or 'webp'"),
    ],
)
def test_bad_bodies_are_400_naming_the_field_as_sent(
    gateway: GatewayProcess, body: dict, param: str, words: str
) -> None:
    assert_error(
        gateway.post("/v1/chat/completions", {**chat_body(), **body}),
        400,
        code="invalid_argument",
        param=param,
        words=words,
    )


def test_images_errors(gateway: GatewayProcess) -> None:
    post = gateway.post
    assert_error(post("/v1/images/generations", {"n": 1}), 400, code="invalid_argument", param="prompt")
    both = {"prompt": PROMPT, "n": 2, "num_outputs_per_prompt": 2}
    error = assert_error(post("/v1/images/generations", both), 400, code="invalid_argument", param="n")
    assert error["message"] == "n and num_outputs_per_prompt both set the number of images; give one"
    flat = {"prompt": PROMPT, "num_outputs_per_prompt": 99}
    assert_error(post("/v1/images/generations", flat), 400, code="invalid_argument", param="num_outputs_per_prompt")
    url = {"prompt": PROMPT, "response_format": "url"}
    assert_error(post("/v1/images/generations", url), 400, code="invalid_argument", param="response_format")
    assert_error(post("/v1/images/generations", {"prompt": PROMPT, "n": 9}), 400, code="invalid_argument", param="n")


@pytest.mark.parametrize(
    ("raw", "code", "words"),
    [
        (b"{bad json", "invalid_json", "the body is not valid JSON"),
        (b'{"messages": [', "invalid_json", "the body is not valid JSON"),
        (b"\xff\xfe", "invalid_json", "the body is not valid JSON"),
        (b"", "invalid_argument", "the body is empty; it must be a JSON object"),
        (b"[1, 2]", "invalid_argument", "the body must be a JSON object"),
        (b'"text"', "invalid_argument", "the body must be a JSON object"),
        (b"null", "invalid_argument", "the body must be a JSON object"),
    ],
)
def test_malformed_json_is_400_never_500(gateway: GatewayProcess, raw: bytes, code: str, words: str) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}, timeout=30
    )
    error = assert_error(response, 400, code=code, words=words)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("route", "raw", "param"),
    [
        ("/v1/images/generations", rb'{"prompt": "a\ud800"}', "prompt"),
        ("/v1/images/generations", rb'{"prompt": "a", "lora": {"path": "\udc00"}}', "lora.path"),
        ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "\ud800"}]}', "messages.0.content"),
        ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "x"}], "\ud800": 1}', "<key>"),
    ],
)
def test_lone_surrogates_are_400_not_500(gateway: GatewayProcess, route: str, raw: bytes, param: str) -> None:
    """JSON can escape a lone surrogate; Python's reader takes it, protobuf cannot encode it."""
    response = httpx.post(
        f"{gateway.url}{route}", content=raw, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert_error(response, 400, code="invalid_argument", param=param, words="not valid Unicode")


def test_other_http_errors_are_openai_shaped(gateway: GatewayProcess) -> None:
    form = httpx.post(f"{gateway.url}/v1/chat/completions", content=b"{}", timeout=30)
    assert_error(form, 415, code="unsupported_media_type", words="Content-Type: application/json")
    big = {"messages": [{"role": "user", "content": "x" * (1024 * 1024 + 1)}]}
    assert_error(gateway.post("/v1/chat/completions", big), 413, code="request_too_large", words="1048576 bytes")
    assert_error(gateway.get("/v1/nothing"), 404, code="not_found")
    assert_error(httpx.delete(f"{gateway.url}/v1/models", timeout=30), 405, code="method_not_allowed")


def test_adapter_errors_map_to_their_http_status(
    gateway: GatewayProcess, style_a: Path, adapter_root: Path, tmp_path: Path
) -> None:
    missing = chat_body(lora={"local_path": str(tmp_path / "absent")})
    assert_error(gateway.post("/v1/chat/completions", missing), 404, code="not_found", param="lora.local_path")
    unknown = chat_body(lora_request={"name": "never-loaded"})
    assert_error(gateway.post("/v1/chat/completions", unknown), 404, code="not_found", param="lora_request.name")
    # "pre" is bound to another adapter's path: a label, it does not fail the request, which is served by the
    # path's own adapter and says so.
    taken = chat_body(lora_request={"path": str(style_a), "name": "pre"}, sampling_params={"num_inference_steps": 2})
    reply = gateway.post("/v1/chat/completions", taken)
    assert reply.status_code == 200 and reply.json()["omni"]["adapter"]["name"] == "style_a"
    dora = tmp_path / "dora"
    shutil.copytree(style_a, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    error = assert_error(
        gateway.post("/v1/chat/completions", chat_body(lora={"local_path": str(dora)})),
        422,
        code="failed_precondition",
        param="lora",  # the adapter at fault, named as the body named it
    )
    assert error["type"] == "unprocessable_entity_error" and "use_dora" in error["message"]


def test_deadline_is_504_and_frees_the_adapter(server: Server, tmp_path: Path) -> None:
    gateway = start_gateway(server.target, ["--request-timeout", "1"], log_path=tmp_path / "gateway.log")
    try:
        slow = chat_body(
            lora_request={"name": "pre"}, sampling_params={"num_inference_steps": 1000, "height": 64, "width": 64}
        )
        assert_error(
            gateway.post("/v1/chat/completions", slow), 504, code="deadline_exceeded", words="--request-timeout"
        )
    finally:
        gateway.stop()
    pre = next(a for a in server.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=10).adapters if a.name == "pre")
    assert pre.in_use == 0


def test_a_client_that_hangs_up_cancels_the_generation(gateway: GatewayProcess, server: Server) -> None:
    slow = chat_body(
        lora_request={"name": "pre"}, sampling_params={"num_inference_steps": 1000, "height": 64, "width": 64}
    )
    since = len(server.log())
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.url}/v1/chat/completions", json=slow, timeout=1.5)
    wait_for(lambda: request_lines(server.log(), since, "adapter=pre#"))
    # Stopped at a step boundary, long before its 1000 steps.
    (line,) = request_lines(server.log(), since, "adapter=pre#")
    assert log_field(line, "outcome") == "CANCELLED" and int(log_field(line, "steps_done")) < 1000, line
    pre = next(a for a in server.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=10).adapters if a.name == "pre")
    assert pre.in_use == 0
    assert "status=499" in gateway.log()


# --- admin routes -------------------------------------------------------------------------------------------


def test_admin_routes_are_off_by_default(gateway: GatewayProcess, style_b: Path) -> None:
    load = gateway.post("/v1/load_lora_adapter", {"lora_name": "b", "lora_path": str(style_b)})
    assert_error(load, 404, code="not_found", words="--enable-lora-admin")
    assert_error(gateway.post("/v1/unload_lora_adapter", {"lora_name": "pre"}), 404, code="not_found")


def test_admin_routes_when_enabled(server: Server, model_dir: Path, adapter_root: Path, tmp_path: Path) -> None:
    path = make_peft_adapter(model_dir, adapter_root / "admin_made", rank=2, alpha=2, seed=44)
    gateway = start_gateway(server.target, ["--enable-lora-admin"], log_path=tmp_path / "gateway.log")
    try:
        assert "/v1/load_lora_adapter" in gateway.get("/openapi.json").json()["paths"]
        loaded = gateway.post("/v1/load_lora_adapter", {"lora_name": "admin_made", "lora_path": str(path), "pin": True})
        assert loaded.status_code == 200, loaded.text
        body = loaded.json()
        assert body["newly_loaded"] is True and body["adapter"]["pinned"] is True
        again = gateway.post("/v1/load_lora_adapter", {"lora_name": "admin_made", "lora_path": str(path)})
        assert again.json()["newly_loaded"] is False
        models = {m["id"]: m for m in gateway.get("/v1/models").json()["data"]}
        assert models["admin_made"]["parent"] == "omni-grpc/tiny-sd3"
        clash = gateway.post("/v1/load_lora_adapter", {"lora_name": "pre", "lora_path": str(path)})
        assert_error(clash, 409, code="already_exists", param="lora_name")
        unloaded = gateway.post("/v1/unload_lora_adapter", {"lora_name": "admin_made"})
        assert unloaded.status_code == 200 and unloaded.json()["adapter"]["id"] == body["adapter"]["id"]
        gone = gateway.post("/v1/unload_lora_adapter", {"lora_name": "admin_made"})
        assert_error(gone, 404, code="not_found", param="lora_name")
        both = gateway.post("/v1/unload_lora_adapter", {"lora_name": "x", "lora_int_id": 3})
        assert_error(both, 400, code="invalid_argument", words="exactly one")
    finally:
        gateway.stop()


# --- the example client -------------------------------------------------------------------------------------


def test_example_client_writes_the_png(gateway: GatewayProcess, style_a: Path, tmp_path: Path) -> None:
    output = tmp_path / "output.png"
    args = ["--prompt", PROMPT, "--lora-path", str(style_a), "--lora-name", "style_a", "--lora-scale", "1.0"]
    size = ["--height", "64", "--width", "64", "--steps", "2", "--seed", "3", "--output", str(output)]
    script = REPO / "examples/online_serving/lora_inference/openai_chat_client.py"
    done = subprocess.run(
        [sys.executable, str(script), "--server", gateway.url, *args, *size],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "adapter style_a at scale 1" in done.stdout
    with Image.open(output) as image:
        assert image.format == "PNG" and image.size == (64, 64)
    # Streamed: a progress bar of the steps on stderr, and the same image.
    streamed_output = tmp_path / "streamed.png"
    size[-1] = str(streamed_output)
    done = subprocess.run(
        [sys.executable, str(script), "--server", gateway.url, *args, *size, "--stream"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "denoising (batch of 1)" in done.stderr and "2/2" in done.stderr
    assert streamed_output.read_bytes() == output.read_bytes()
    bad = subprocess.run(
        [sys.executable, str(script), "--server", gateway.url, "--prompt", "x", "--lora-path", str(tmp_path / "no")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "404" in bad.stderr and "does not exist" in bad.stderr


# --- the status mapping, for every gRPC status --------------------------------------------------------------


class _StatusEcho(omni_pb2_grpc.OmniServiceServicer):
    """Answers Generate with the gRPC status named by the prompt: the mapping's test bed for the statuses the
    real server only gives under conditions built elsewhere (tokens, --lora-dirs, a full queue)."""

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        context.abort(grpc.StatusCode[request.prompt], f"the server said {request.prompt}")
        raise AssertionError("unreachable")

    def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetServerInfoResponse:
        # The gateway asks once what the model makes before its first generation.
        return pb.GetServerInfoResponse(family="sd3", capabilities=pb.Capabilities(output=pb.OUTPUT_KIND_IMAGE))


@pytest.fixture(scope="module")
def echo_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    server = grpc.server(ThreadPoolExecutor(4))
    omni_pb2_grpc.add_OmniServiceServicer_to_server(_StatusEcho(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    gateway = start_gateway(f"127.0.0.1:{port}", [], log_path=tmp_path_factory.mktemp("logs") / "echo-gateway.log")
    yield gateway
    gateway.stop()
    server.stop(None)


@pytest.mark.parametrize(
    ("grpc_status", "http_status", "error_type"),
    [
        ("INVALID_ARGUMENT", 400, "invalid_request_error"),
        ("UNAUTHENTICATED", 401, "authentication_error"),
        ("PERMISSION_DENIED", 403, "permission_error"),
        ("NOT_FOUND", 404, "not_found_error"),
        ("ALREADY_EXISTS", 409, "conflict_error"),
        ("FAILED_PRECONDITION", 422, "unprocessable_entity_error"),
        ("RESOURCE_EXHAUSTED", 429, "rate_limit_error"),
        ("UNAVAILABLE", 503, "service_unavailable_error"),
        ("DEADLINE_EXCEEDED", 504, "timeout_error"),
        ("INTERNAL", 500, "server_error"),
    ],
)
def test_every_grpc_status_maps_to_its_http_status(
    echo_gateway: GatewayProcess, grpc_status: str, http_status: int, error_type: str
) -> None:
    body = {"messages": [{"role": "user", "content": grpc_status}]}
    error = assert_error(echo_gateway.post("/v1/chat/completions", body), http_status, code=grpc_status.lower())
    assert error["type"] == error_type


def test_an_unexpected_failure_is_a_500_error_object_and_its_log_line_escapes_the_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import asyncio

    from omni_grpc_gateway.app import create_app

    app = create_app()

    @app.get("/boom/{rest:path}")
    async def boom(rest: str) -> None:
        raise RuntimeError("a bug")

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            return await client.get("/boom/x%1b[31mred")

    with caplog.at_level(logging.ERROR, logger="omni_grpc_gateway"):
        response = asyncio.run(call())
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "internal error; the gateway logged the details"
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("unexpected failure")]
    assert line == "unexpected failure in GET /boom/x\\x1b[31mred"  # ESC escaped: no terminal colours
