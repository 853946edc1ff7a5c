"""SDXL on a tiny model built from code (two text encoders, micro-conditioning): PEFT and diffusers LoRA files
against diffusers + peft, mixed batches equal to solo runs, bit-identical base output, the family's refusals.
(Kohya SDXL files: tests/test_lora_formats.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from omni_grpc.engine.adapter_backend import LoadingBudget, PipelineFit
from omni_grpc.engine.adapter_files import AdapterReader, LayoutMemo
from omni_grpc.engine.engine import Engine
from omni_grpc.engine.types import GenerateRequest, GuidanceKind, LoraRequest, OutputKind, SamplingParams
from omni_grpc.errors import InvalidArgument
from omni_grpc.tiny_models.sdxl import build_tiny_sdxl
from tests.helpers import base_unchanged_by_adapters, started_engine
from tests.lora_factory import load_reference_pipeline, make_peft_adapter, reference_pixels

PROMPT = "a photo of a cat sitting on a red chair"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def sdxl(sdxl_dir: Path) -> Iterator[Engine]:
    with started_engine(model=str(sdxl_dir), allow_any_lora_path=True, dtype="float32") as engine:
        yield engine


@pytest.fixture(scope="module")
def peft_adapter(sdxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sdxl-loras")
    return make_peft_adapter(sdxl_dir, root / "a", rank=4, alpha=8, targets=UNET_TARGETS, seed=1, magnitude=0.5)


@pytest.fixture(scope="module")
def diffusers_file(peft_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights in diffusers' own format, written by diffusers' SDXL writer."""
    out = tmp_path_factory.mktemp("sdxl-diffusers")
    tensors = {
        k.removeprefix("base_model.model."): v for k, v in load_file(peft_adapter / "adapter_model.safetensors").items()
    }
    StableDiffusionXLPipeline.save_lora_weights(
        out,
        unet_lora_layers=tensors,
        unet_lora_adapter_metadata={"r": 4, "lora_alpha": 8, "target_modules": list(UNET_TARGETS)},
    )
    return out / "pytorch_lora_weights.safetensors"


def request(
    lora: LoraRequest | None = None, *, seed: int = 0, guidance: float = 5.0, negative: str = ""
) -> GenerateRequest:
    sampling = SamplingParams(height=64, width=64, num_inference_steps=2, seed=seed, guidance_scale=guidance)
    return GenerateRequest(prompt=PROMPT, negative_prompt=negative, sampling=sampling, lora=lora)


def run(engine: Engine, req: GenerateRequest) -> np.ndarray:
    return np.asarray(engine.generate(req).images[0].array)


def reference(sdxl_dir: Path, *, seed: int, adapter: Path | None = None, scale: float = 1.0) -> np.ndarray:
    return reference_pixels(sdxl_dir, prompt=PROMPT, seed=seed, adapter=adapter, scale=scale, guidance_scale=5.0)


def test_family_and_capabilities(sdxl: Engine) -> None:
    pipeline = sdxl.pipeline
    assert pipeline.family.name == "sdxl" and pipeline.spatial_multiple == 8
    assert set(pipeline.lora_parts) == {"unet", "text_encoder", "text_encoder_2"}
    caps = pipeline.capabilities
    assert (caps.output, caps.negative_prompt, caps.guidance) == (OutputKind.IMAGE, True, GuidanceKind.CFG)


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("form", ["peft", "diffusers"])
def test_lora_equals_diffusers_and_peft(
    sdxl: Engine, sdxl_dir: Path, peft_adapter: Path, diffusers_file: Path, scale: float, form: str
) -> None:
    path = peft_adapter if form == "peft" else diffusers_file
    got = run(sdxl, request(LoraRequest(path=str(path), scale=scale), seed=3))
    np.testing.assert_allclose(got, reference(sdxl_dir, seed=3, adapter=peft_adapter, scale=scale), atol=1e-4, rtol=0)
    assert np.abs(got - reference(sdxl_dir, seed=3)).max() > 1e-2


def test_base_output_is_bit_identical_with_adapters_loaded(sdxl_dir: Path, peft_adapter: Path) -> None:
    before = base_unchanged_by_adapters(sdxl_dir, peft_adapter, lambda engine, lora: run(engine, request(lora, seed=4)))
    np.testing.assert_allclose(before, reference(sdxl_dir, seed=4), atol=1e-5, rtol=0)


def test_mixed_batch_equals_solo_runs(sdxl: Engine, peft_adapter: Path, diffusers_file: Path) -> None:
    asked = [
        request(LoraRequest(path=str(peft_adapter)), seed=5, guidance=5.0),
        request(seed=6, guidance=2.0),
        request(LoraRequest(path=str(diffusers_file), scale=0.5), seed=7, guidance=8.0),
    ]
    solo = [run(sdxl, r) for r in asked]
    together = sdxl.generate_many(asked)
    assert [r.batch_size for r in together] == [3, 3, 3]
    for alone, batched in zip(solo, together, strict=True):
        np.testing.assert_allclose(np.asarray(batched.images[0].array), alone, atol=1e-4, rtol=0)


def test_sizes_must_be_multiples_of_8(sdxl: Engine) -> None:
    with pytest.raises(InvalidArgument, match="must be a multiple of 8") as refused:
        sdxl.generate(GenerateRequest(prompt=PROMPT, sampling=SamplingParams(height=68, width=64)))
    assert refused.value.field == "sampling_params.height"


@pytest.fixture(scope="module")
def wide_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL with encoders of two widths, as the real model's (768 and 1280)."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl-wide"), text_encoder_2_hidden=48)


def text_encoder_lora(encoder: Any, seed: int) -> dict[str, torch.Tensor]:
    """peft LoRA layers (rank 4, alpha 8) on an encoder's attention, as diffusers' writer takes them."""
    torch.manual_seed(seed)
    model = get_peft_model(encoder, LoraConfig(r=4, lora_alpha=8, target_modules=list(TE_TARGETS)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    return {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(model).items()}


def test_a_diffusers_file_for_both_text_encoders_equals_diffusers(wide_sdxl_dir: Path, tmp_path: Path) -> None:
    """Both encoders have modules of the same names (text_model.encoder.layers.0.self_attn.q_proj, ...) but not of
    the same shapes: each module of the file goes into its own encoder."""
    pipe = load_reference_pipeline(wide_sdxl_dir)
    config = {"r": 4, "lora_alpha": 8, "target_modules": list(TE_TARGETS)}
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        text_encoder_lora_layers=text_encoder_lora(pipe.text_encoder, 1),
        text_encoder_2_lora_layers=text_encoder_lora(pipe.text_encoder_2, 2),
        text_encoder_lora_adapter_metadata=config,
        text_encoder_2_lora_adapter_metadata=config,
    )
    file = tmp_path / "pytorch_lora_weights.safetensors"
    # Each encoder's keys under text_model., as diffusers' training scripts write them: one name, two modules.
    with safe_open(str(file), "pt") as opened:
        metadata = opened.metadata()
    tensors = {
        key if ".text_model." in key else key.replace(".", ".text_model.", 1): value
        for key, value in load_file(file).items()
    }
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    save_file(tensors, file, metadata=metadata)
    reference = load_reference_pipeline(wide_sdxl_dir)
    reference.load_lora_weights(str(file))
    generator = [torch.Generator("cpu").manual_seed(7)]
    call = {"height": 64, "width": 64, "num_inference_steps": 2, "guidance_scale": 5.0, "output_type": "np"}
    expected = np.asarray(reference(prompt=PROMPT, generator=generator, **call).images[0])
    base = reference_pixels(wide_sdxl_dir, prompt=PROMPT, seed=7, guidance_scale=5.0)
    assert np.abs(expected - base).max() > 0.01  # the adapter shows
    with started_engine(model=str(wide_sdxl_dir), allow_any_lora_path=True, dtype="float32") as engine:
        info, _ = engine.load_adapter(str(file))
        assert info.components == ["text_encoder", "text_encoder_2"] and info.num_layers == 16
        got = run(engine, request(LoraRequest(path=str(file)), seed=7))
        # Each module judged against its own encoder, and its own float32 pair taken as the file holds it.
        memo = LayoutMemo()
        fit = PipelineFit(engine.lora, LoadingBudget(1 << 30).session().__enter__())
        AdapterReader(max_rank=64, fit=fit, memo=memo).read(str(file))
        ((_, fitted),) = memo.fitted.items()
        assert len(fitted.fits) == 16 and fitted.own is not None
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
