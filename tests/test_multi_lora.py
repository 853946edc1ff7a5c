"""Several adapters in one request, each with its own scale: equal to diffusers' own composition
(`set_adapters([a, b], [wa, wb])`), per sample inside one denoising batch, over gRPC (`loras`, `adapters`) and
through the gateway in both body shapes with the official `openai` client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import openai
import pytest
import torch
from openai.types.chat import ChatCompletionMessageParam
from safetensors.torch import save_file

from examples.online_serving.lora_inference import openai_chat_client
from omni_grpc.engine.engine import Engine
from omni_grpc.engine.types import GenerateRequest, LoraRequest, SamplingParams
from omni_grpc.v1 import omni_pb2 as pb
from tests.helpers import (
    PROMPT,
    InProcessGateway,
    Server,
    field_violation,
    listed,
    log_field,
    request_lines,
    rpc_error,
    started_engine,
    unload,
)
from tests.kohya_files import kohya_name, lora_parts, te_kohya_name
from tests.lora_factory import load_reference_pipeline, make_peft_adapter, to_diffusers_file

STEPS = 2
SMALL = pb.SamplingParams(height=32, width=32, num_inference_steps=STEPS, seed=21)


@pytest.fixture(scope="module")
def style_c(model_dir: Path, adapter_root: Path) -> Path:
    return make_peft_adapter(model_dir, adapter_root / "style_c", rank=3, alpha=6, seed=4, targets=("to_k", "to_out.0"))


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[Engine]:
    with started_engine(model=str(model_dir), allow_any_lora_path=True, dtype="float32") as eng:
        yield eng


def generate_request(*loras: LoraRequest, seed: int = 5) -> GenerateRequest:
    sampling = SamplingParams(height=32, width=32, num_inference_steps=STEPS, seed=seed)
    return GenerateRequest(prompt=PROMPT, negative_prompt="blurry", sampling=sampling, loras=list(loras))


def image(result: Any) -> np.ndarray:
    return np.asarray(result.images[0].array)


@pytest.mark.parametrize("weights", [(0.7, -0.4), (1.0, 0.0), (-1.2, 1.5)])
def test_composition_equals_diffusers_set_adapters(
    engine: Engine, model_dir: Path, style_a: Path, style_b: Path, tmp_path: Path, weights: tuple[float, float]
) -> None:
    pipe = load_reference_pipeline(model_dir)
    for name, folder in (("a", style_a), ("b", style_b)):
        pipe.load_lora_weights(str(to_diffusers_file(folder, tmp_path / name)), adapter_name=name)
    pipe.set_adapters(["a", "b"], list(weights))
    out = pipe(
        prompt=PROMPT,
        negative_prompt="blurry",
        height=32,
        width=32,
        num_inference_steps=STEPS,
        generator=[torch.Generator("cpu").manual_seed(5)],
        output_type="np",
    )
    loras = [LoraRequest(path=str(style_a), scale=weights[0]), LoraRequest(path=str(style_b), scale=weights[1])]
    got = image(engine.generate(generate_request(*loras)))
    np.testing.assert_allclose(got, out.images[0], rtol=0, atol=1e-4)


def test_combinations_are_per_sample_in_one_batch(engine: Engine, style_a: Path, style_b: Path, style_c: Path) -> None:
    a, b, c = (str(p) for p in (style_a, style_b, style_c))
    asked = [
        generate_request(LoraRequest(path=a), seed=1),
        generate_request(LoraRequest(path=a, scale=0.5), LoraRequest(path=b, scale=1.2), seed=2),
        generate_request(LoraRequest(path=b), LoraRequest(path=c, scale=-0.8), seed=3),
        generate_request(seed=4),
    ]
    solo = [image(engine.generate(r)) for r in asked]
    together = engine.generate_many(asked)
    assert [r.batch_size for r in together] == [4, 4, 4, 4]
    for alone, batched in zip(solo, together, strict=True):
        np.testing.assert_allclose(image(batched), alone, rtol=0, atol=1e-4)
    # Each combination is its own image (no sample took another's adapters).
    assert min(float(np.abs(x - y).max()) for i, x in enumerate(solo) for y in solo[i + 1 :]) > 1e-2
    assert [[a.scale for a in r.adapters] for r in together] == [[1.0], [0.5, 1.2], [1.0, -0.8], []]


# ---- the contract ------------------------------------------------------------------------------------------------


def generate(server: Server, *loras: pb.LoraRequest, **fields: Any) -> pb.GenerateResponse:
    request = pb.GenerateRequest(prompt=PROMPT, sampling_params=SMALL, loras=list(loras), **fields)
    return server.stub.Generate(request, timeout=120)


def test_loras_over_grpc_name_every_adapter_in_order(server: Server, style_a: Path, style_b: Path) -> None:
    since = len(server.log())
    reply = generate(server, pb.LoraRequest(path=str(style_a), scale=0.7), pb.LoraRequest(name="pre", scale=-0.4))
    assert [(a.name, a.scale) for a in reply.adapters] == [
        ("style_a", pytest.approx(0.7)),
        ("pre", pytest.approx(-0.4)),
    ]
    assert not reply.HasField("adapter")  # filled only when exactly one adapter was applied
    assert reply.adapters[0].path == str(style_a) and reply.adapters[1].path == ""  # as sent: "pre" came by name
    (line,) = request_lines(server.log(), since, "style_a#")
    assert log_field(line, "adapter") == f"style_a#{reply.adapters[0].id}@0.7,pre#{reply.adapters[1].id}@-0.4"
    one = generate(server, pb.LoraRequest(path=str(style_b)))
    assert one.HasField("adapter") and [one.adapter] == list(one.adapters) and one.adapter.name == "style_b"
    # A one-element `loras` and `lora_request` are the same request.
    seed_request = pb.GenerateRequest(prompt=PROMPT, sampling_params=SMALL, lora_request=pb.LoraRequest(name="pre"))
    assert server.stub.Generate(seed_request, timeout=120).images[0].data == (
        generate(server, pb.LoraRequest(name="pre")).images[0].data
    )


def test_loras_errors(server: Server, style_a: Path, tmp_path: Path) -> None:
    both = pb.GenerateRequest(
        prompt=PROMPT, lora_request=pb.LoraRequest(name="pre"), loras=[pb.LoraRequest(name="pre")]
    )
    error = rpc_error(server.stub.Generate, both, timeout=30)
    assert (
        error.code() == grpc.StatusCode.INVALID_ARGUMENT and "give lora_request or loras, not both" in error.details()
    )
    error = rpc_error(generate, server, *[pb.LoraRequest(name="pre")] * 5)
    assert (
        error.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit is 4 (--max-loras-per-request)" in error.details()
    )
    assert field_violation(error) == "loras"
    # The same adapter twice, by path and by name.
    error = rpc_error(generate, server, pb.LoraRequest(path=str(style_a)), pb.LoraRequest(name="style_a", scale=2))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "loras[1] names the same adapter as loras[0] ('style_a')" in error.details()
    assert field_violation(error) == "loras[1]"
    error = rpc_error(generate, server, pb.LoraRequest(name="pre"), pb.LoraRequest(name="pre", scale=11))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violation(error) == "loras[1].scale"
    assert "loras[1].scale must be a finite number between -10 and 10" in error.details()
    error = rpc_error(generate, server, pb.LoraRequest(name="pre"), pb.LoraRequest(path=str(tmp_path / "absent")))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "does not exist on the server machine" in error.details()
    assert listed(server)["pre"].in_use == 0  # every adapter held for a refused request is released


def test_list_adapters_shows_format_and_components(server: Server, model_dir: Path, tmp_path: Path) -> None:
    pipe = load_reference_pipeline(model_dir)
    g = torch.Generator().manual_seed(3)
    module, te_module = "transformer_blocks.0.attn.to_q", "text_model.encoder.layers.0.self_attn.q_proj"
    tensors = {
        f"{kohya_name('lora_transformer', module)}.{role}": t
        for role, t in lora_parts(pipe.transformer.get_submodule(module), 2, 1.0, g).items()
    }
    tensors.update(
        {
            f"{te_kohya_name('lora_te1', te_module)}.{role}": t
            for role, t in lora_parts(pipe.text_encoder.get_submodule(te_module), 2, 1.0, g).items()
        }
    )
    file = tmp_path / "kohya_sd3.safetensors"
    save_file(tensors, str(file))
    reply = generate(server, pb.LoraRequest(path=str(file)))
    entry = listed(server)[reply.adapter.name]
    assert entry.format == pb.ADAPTER_FORMAT_KOHYA and list(entry.components) == ["denoiser", "text_encoder"]
    assert (entry.rank, entry.alpha, entry.num_layers, entry.version) == (2, 1.0, 2, 1)
    assert listed(server)["pre"].format == pb.ADAPTER_FORMAT_PEFT and list(listed(server)["pre"].components) == [
        "denoiser"
    ]
    unload(server, name=reply.adapter.name)


# ---- the gateway -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(gateway: InProcessGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)


def omni_of(response: Any) -> dict[str, Any]:
    return (response.model_extra or {})["omni"]


def error_body(error: openai.APIStatusError) -> dict[str, Any]:
    """The gateway's error object (the client hands it over untyped)."""
    assert isinstance(error.body, dict), error.body
    return error.body


def test_gateway_takes_loras_in_both_shapes(client: openai.OpenAI, style_a: Path) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
    loras = [{"local_path": str(style_a), "scale": 0.7}, {"lora_name": "pre", "lora_scale": -0.4}]
    flat = client.chat.completions.create(
        model="m",
        messages=messages,
        extra_body={"loras": loras, "height": 32, "width": 32, "num_inference_steps": STEPS, "seed": 9},
    )
    nested = client.chat.completions.create(
        model="m",
        messages=messages,
        extra_body={
            "loras": [{"path": str(style_a), "scale": 0.7}, {"name": "pre", "scale": -0.4}],
            "sampling_params": {"height": 32, "width": 32, "num_inference_steps": STEPS, "seed": 9},
        },
    )
    for response in (flat, nested):
        adapters = omni_of(response)["adapters"]
        assert [(a["name"], round(a["scale"], 3)) for a in adapters] == [("style_a", 0.7), ("pre", -0.4)]
        assert omni_of(response)["adapter"] is None
    assert flat.choices[0].message.content == nested.choices[0].message.content


def test_gateway_loras_errors(client: openai.OpenAI, style_a: Path, tmp_path: Path) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]

    def error(body: dict[str, Any]) -> openai.APIStatusError:
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="m", messages=messages, extra_body=body)
        return info.value

    mixed = error({"lora": {"name": "pre"}, "loras": [{"name": "pre"}]})
    assert mixed.status_code == 400 and error_body(mixed)["param"] == "loras"
    assert "give loras or lora, not both" in error_body(mixed)["message"]
    missing = error({"loras": [{"name": "pre"}, {"path": str(tmp_path / "absent")}], "num_inference_steps": 2})
    assert missing.status_code == 404 and error_body(missing)["param"] == "loras.1.path"
    twice = error({"loras": [{"path": str(style_a)}, {"path": str(style_a) + "/"}], "num_inference_steps": 2})
    assert twice.status_code == 400 and error_body(twice)["param"] == "loras.1"
    spelled_twice = error({"loras": [{"path": "a", "local_path": "b"}]})
    assert spelled_twice.status_code == 400 and "has both path and local_path" in error_body(spelled_twice)["message"]


def test_openai_client_example_takes_repeated_lora(
    gateway: InProcessGateway, style_a: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out.png"
    args = ["--server", gateway.url, "--prompt", PROMPT, "--lora", f"{style_a}:0.7", "--lora", "pre"]
    code = openai_chat_client.main([*args, "--height", "32", "--width", "32", "--steps", "2", "--output", str(output)])
    assert code == 0 and output.stat().st_size > 0
    assert "adapters style_a at scale 0.7, pre at scale 1" in capsys.readouterr().out
