"""Qwen-Image on a tiny model built from code: LoRA against diffusers + peft, true CFG (guidance_scale is its
true_cfg_scale, with the negative prompt) per sample in one batch, bit-identical base output, its refusals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from omni_grpc.engine.engine import Engine
from omni_grpc.engine.types import GenerateRequest, GuidanceKind, LoraRequest, OutputKind, SamplingParams
from omni_grpc.errors import InvalidArgument
from omni_grpc.tiny_models.qwen_image import build_tiny_qwen_image
from tests.helpers import base_unchanged_by_adapters, started_engine
from tests.lora_factory import make_peft_adapter, reference_pixels

PROMPT = "a photo of a cat sitting on a red chair"
QWEN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen_image(tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="module")
def qwen(qwen_dir: Path) -> Iterator[Engine]:
    with started_engine(model=str(qwen_dir), allow_any_lora_path=True, dtype="float32") as engine:
        yield engine


@pytest.fixture(scope="module")
def adapter(qwen_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qwen-loras")
    return make_peft_adapter(qwen_dir, root / "a", rank=4, alpha=8, targets=QWEN_TARGETS, seed=1, magnitude=0.5)


def request(
    lora: LoraRequest | None = None, *, seed: int = 0, guidance: float | None = 4.0, negative: str = "blurry"
) -> GenerateRequest:
    sampling = SamplingParams(height=64, width=64, num_inference_steps=2, seed=seed, guidance_scale=guidance)
    return GenerateRequest(prompt=PROMPT, negative_prompt=negative, sampling=sampling, lora=lora)


def run(engine: Engine, req: GenerateRequest) -> np.ndarray:
    return np.asarray(engine.generate(req).images[0].array)


def reference(
    qwen_dir: Path, *, seed: int, adapter: Path | None = None, scale: float = 1.0, true_cfg: float = 4.0
) -> np.ndarray:
    return reference_pixels(
        qwen_dir,
        prompt=PROMPT,
        seed=seed,
        adapter=adapter,
        scale=scale,
        negative_prompt="blurry",
        true_cfg_scale=true_cfg,
    )


def test_family_and_capabilities(qwen: Engine) -> None:
    pipeline = qwen.pipeline
    assert pipeline.family.name == "qwen-image" and pipeline.spatial_multiple == 16
    assert (pipeline.default_height, pipeline.default_steps, pipeline.default_guidance) == (1024, 50, 4.0)
    caps = pipeline.capabilities
    assert (caps.output, caps.negative_prompt, caps.guidance) == (OutputKind.IMAGE, True, GuidanceKind.TRUE_CFG)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_lora_equals_diffusers_and_peft(qwen: Engine, qwen_dir: Path, adapter: Path, scale: float) -> None:
    got = run(qwen, request(LoraRequest(path=str(adapter), scale=scale), seed=3))
    np.testing.assert_allclose(got, reference(qwen_dir, seed=3, adapter=adapter, scale=scale), atol=1e-4, rtol=0)
    assert np.abs(got - reference(qwen_dir, seed=3)).max() > 1e-3


def test_base_output_is_bit_identical_with_adapters_loaded(qwen_dir: Path, adapter: Path) -> None:
    before = base_unchanged_by_adapters(qwen_dir, adapter, lambda engine, lora: run(engine, request(lora, seed=4)))
    np.testing.assert_allclose(before, reference(qwen_dir, seed=4), atol=1e-5, rtol=0)


def test_true_cfg_per_sample_in_one_batch(qwen: Engine, qwen_dir: Path, adapter: Path) -> None:
    asked = [
        request(LoraRequest(path=str(adapter)), seed=5, guidance=4.0),
        request(seed=6, guidance=2.0, negative="low quality, dark"),
        request(LoraRequest(path=str(adapter), scale=0.5), seed=7, guidance=7.0),
    ]
    solo = [run(qwen, r) for r in asked]
    together = qwen.generate_many(asked)
    assert [r.batch_size for r in together] == [3, 3, 3]
    for alone, batched in zip(solo, together, strict=True):
        np.testing.assert_allclose(np.asarray(batched.images[0].array), alone, atol=1e-4, rtol=0)
    # The request's guidance_scale is diffusers' true_cfg_scale.
    np.testing.assert_allclose(
        run(qwen, request(seed=8, guidance=2.5)), reference(qwen_dir, seed=8, true_cfg=2.5), atol=1e-5, rtol=0
    )


def test_without_a_negative_prompt_no_guidance_runs_and_batches_apart(qwen: Engine) -> None:
    # As in diffusers: true CFG needs a negative prompt; without one the scale changes nothing.
    plain = run(qwen, request(seed=9, guidance=4.0, negative=""))
    assert np.array_equal(run(qwen, request(seed=9, guidance=7.0, negative="")), plain)
    guided, unguided = qwen.generate_many([request(seed=9), request(seed=10, negative="")])
    assert (guided.batch_size, unguided.batch_size) == (1, 1)


def test_sizes_must_be_multiples_of_16(qwen: Engine) -> None:
    with pytest.raises(InvalidArgument, match="must be a multiple of 16"):
        qwen.generate(GenerateRequest(prompt=PROMPT, sampling=SamplingParams(height=64, width=72)))
