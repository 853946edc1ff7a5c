"""Build real adapters with peft, and reference images computed with diffusers + peft directly.

The references never go through omni-grpc's loader: peft's own PeftModel.from_pretrained injects the
adapter, and peft's own set_scale applies a scale. That makes them an independent oracle.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors.torch import load_file, save_file

SD3_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def make_peft_adapter(
    model_dir: Path,
    out: Path,
    *,
    rank: int = 4,
    alpha: float = 8,
    targets: Sequence[str] = SD3_TARGETS,
    seed: int = 0,
    unet: bool = False,
    magnitude: float = 1.0,
    component: str | None = None,
) -> Path:
    """A PEFT-format adapter (adapter_config.json + adapter_model.safetensors) with random weights, on the
    pipeline's denoiser (`component`: another one, e.g. Wan 2.2's transformer_2)."""
    index = json.loads((model_dir / "model_index.json").read_text())
    if component is None:
        component = "unet" if unet or "unet" in index else "transformer"
    model = getattr(diffusers, index[component][1]).from_pretrained(str(model_dir / component))
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights="gaussian")
    )
    # "gaussian" init leaves lora_B at zero (a no-op adapter); give B weights so the adapter shows.
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, magnitude)
    peft_model.save_pretrained(out)
    return out


def to_diffusers_file(peft_dir: Path, out_dir: Path, pipeline: Any = StableDiffusion3Pipeline) -> Path:
    """Convert a PEFT folder (of a transformer) into diffusers' own LoRA format, with `pipeline`'s own writer."""
    tensors = {
        k.removeprefix("base_model.model."): v for k, v in load_file(peft_dir / "adapter_model.safetensors").items()
    }
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    metadata = {k: config[k] for k in ("r", "lora_alpha", "target_modules")}
    pipeline.save_lora_weights(out_dir, transformer_lora_layers=tensors, transformer_lora_adapter_metadata=metadata)
    return out_dir / "pytorch_lora_weights.safetensors"


def edit_config(adapter: Path, **changes: object) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def rewrite_tensors(adapter_file: Path, fn) -> None:
    """Rewrite a safetensors file through fn(dict) -> dict."""
    tensors = load_file(adapter_file)
    save_file(fn(tensors), adapter_file)


def load_reference_pipeline(model_dir: Path) -> DiffusionPipeline:
    index = json.loads((model_dir / "model_index.json").read_text())
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
    pipe = DiffusionPipeline.from_pretrained(str(model_dir), **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_pipeline_with(model_dir: Path, adapter: Path | None, scale: float = 1.0) -> DiffusionPipeline:
    """Plain diffusers with peft's own adapter (PeftModel.from_pretrained) on the denoiser at `scale`."""
    pipe = load_reference_pipeline(model_dir)
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    if adapter is not None:
        PeftModel.from_pretrained(denoiser, str(adapter))
        for module in denoiser.modules():
            if isinstance(module, LoraLayer):
                module.set_scale("default", scale)
    return pipe


def reference_pixels(
    model_dir: Path, *, prompt: str, seed: int, adapter: Path | None = None, scale: float = 1.0, **call: Any
) -> np.ndarray:
    """What diffusers + peft produce for one 64x64, 2-step image, as floats in [0, 1] (before 8-bit rounding);
    `call` holds the family's own arguments (guidance_scale, true_cfg_scale, negative_prompt)."""
    pipe = reference_pipeline_with(model_dir, adapter, scale)
    out = pipe(
        prompt=prompt,
        height=64,
        width=64,
        num_inference_steps=2,
        generator=[torch.Generator("cpu").manual_seed(seed)],
        output_type="np",
        **call,
    )
    return np.asarray(out.images[0])


def reference_image(
    model_dir: Path,
    *,
    prompt: str,
    seed: int,
    steps: int,
    size: int = 64,
    adapter: Path | None = None,
    scale: float = 1.0,
    guidance_scale: float | None = None,
) -> np.ndarray:
    """The image plain diffusers + peft produce, as uint8 HxWx3."""
    pipe = reference_pipeline_with(model_dir, adapter, scale)
    kwargs = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    out = pipe(
        prompt=prompt,
        height=size,
        width=size,
        num_inference_steps=steps,
        generator=[torch.Generator("cpu").manual_seed(seed)],
        output_type="pil",
        **kwargs,
    )
    return np.asarray(out.images[0].convert("RGB"))


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def assert_close_image(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float rounding before the uint8 cast (at most one level off per pixel)."""
    assert actual.shape == expected.shape
    diff = np.abs(actual.astype(int) - expected.astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()} (mean {diff.mean():.3f})"


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(float) - b.astype(float)).mean())
