"""Load a diffusers pipeline (local folder, hub id or the embedded default) and run it; what differs between
model families is asked of the pipeline's family (`families/`)."""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from torch import nn
from transformers.utils import logging as transformers_logging

from omni_grpc.engine.families import FAMILIES, Capabilities, Family, family_of
from omni_grpc.engine.families.base import BatchCall
from omni_grpc.engine.guidance import SampleGuidance
from omni_grpc.engine.kohya_names import KohyaTable
from omni_grpc.engine.previews import LatentPreview
from omni_grpc.engine.types import OutputKind
from omni_grpc.errors import ModelLoadError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Called after each denoising step with its index and the latents (one row per sample); may raise to stop.
OnStep = Callable[[int, torch.Tensor], None]


@dataclass
class LoadedPipeline:
    pipe: Any
    family: Family
    model_name: str
    denoiser: nn.Module
    # Height and width must be multiples of this (VAE factor x patch size for transformers).
    spatial_multiple: int
    # Largest height or width the denoiser can take (SD3's position table bounds it); None: no bound.
    max_side: int | None
    default_height: int
    default_width: int
    default_steps: int
    default_guidance: float
    device: torch.device
    dtype: torch.dtype
    guidance: SampleGuidance
    # The parts adapters may adapt (the denoisers' components, default first, then the text encoders'), by name.
    lora_parts: dict[str, nn.Module]
    denoiser_component: str
    # The modules Kohya / LyCORIS names stand for in this pipeline.
    kohya_table: KohyaTable
    capabilities: Capabilities
    # Pictures of latents mid-denoising, for streaming callers.
    preview: LatentPreview

    def fresh_pipe(self) -> Any:
        """A pipeline object of its own for one call, sharing every model (about a millisecond): a call keeps
        its progress in the pipeline and its scheduler, and calls in flight take turns on the models."""
        components = dict(self.pipe.components)
        components["scheduler"] = copy.deepcopy(self.pipe.scheduler)
        # And the settings the constructor takes besides components (Wan 2.2's boundary_ratio, SDXL's
        # force_zeros_for_empty_prompt): without them the pipeline would run another model.
        params = inspect.signature(type(self.pipe).__init__).parameters
        settings = {k: self.pipe.config[k] for k in params if k not in components and k in self.pipe.config}
        pipe = type(self.pipe)(**components, **settings)
        pipe.set_progress_bar_config(**getattr(self.pipe, "_progress_bar_config", {}))
        return pipe


def resolve_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # Half precision is the norm on GPUs; CPUs run float32 (bf16 matmuls there are slow).
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got '{dtype}'")
    return DTYPES[dtype]


def load_pipeline(
    model: str | None,
    *,
    device: str | None = None,
    dtype: str = "auto",
    cache_dir: Path | None = None,
    progress_bar: bool = False,
    served_name: str | None = None,
) -> LoadedPipeline:
    """Load `model` (a local diffusers folder or a hub id), or the embedded default when None.

    Clients see it as `served_name`, by default the hub id or the folder's name: never the server's path.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if not progress_bar:
        # Loading bars are noise in a server's log.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    if model is None:
        from omni_grpc.tiny_models.default import DEFAULT_MODEL_NAME, default_model_dir

        folder = default_model_dir(cache_dir)
        pipe = _from_folder(folder, torch_dtype)
        model_name = DEFAULT_MODEL_NAME
    elif Path(model).expanduser().is_dir():
        folder = Path(model).expanduser()
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(f"'{model}' is a folder but not a diffusers pipeline: model_index.json is missing")
        pipe = _from_folder(folder, torch_dtype)
        model_name = folder.resolve().name
    elif Path(model).expanduser().exists():
        raise ModelLoadError(f"--model '{model}' is a file; give a diffusers pipeline folder or a hub id")
    else:
        pipe = _from_hub(model, torch_dtype)
        model_name = model

    model_name = served_name or model_name
    family = family_of(pipe)
    if family is None:
        supported = ", ".join(sorted(FAMILIES))
        raise ModelLoadError(f"'{model_name}' is a {type(pipe).__name__}; supported: {supported}")
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=not progress_bar)
    experts = {name: getattr(pipe, name) for name in family.experts(pipe)}
    denoiser_component, denoiser = next(iter(experts.items()))
    for expert in experts.values():
        expert.eval()
    text_encoders = {
        name: module for name in family.text_encoders if isinstance(module := getattr(pipe, name, None), nn.Module)
    }
    geometry = family.geometry(pipe)
    default_steps, default_guidance = family.defaults(pipe)
    loaded = LoadedPipeline(
        pipe=pipe,
        family=family,
        model_name=model_name,
        denoiser=denoiser,
        spatial_multiple=geometry.spatial_multiple,
        max_side=geometry.max_side,
        default_height=geometry.default_height,
        default_width=geometry.default_width,
        default_steps=default_steps,
        default_guidance=default_guidance,
        device=dev,
        dtype=torch_dtype,
        guidance=family.guidance_hooks(pipe),
        lora_parts={**experts, **text_encoders},
        denoiser_component=denoiser_component,
        kohya_table=family.kohya_table(denoiser, text_encoders),
        capabilities=family.capabilities(pipe),
        preview=LatentPreview(pipe, family),
    )
    log.info(
        "model loaded name=%s family=%s device=%s dtype=%s default=%dx%d steps=%d",
        model_name,
        family.name,
        dev,
        str(torch_dtype).removeprefix("torch."),
        geometry.default_width,
        geometry.default_height,
        loaded.default_steps,
    )
    return loaded


def _from_folder(folder: Path, torch_dtype: torch.dtype) -> Any:
    index = json.loads((folder / "model_index.json").read_text())
    # Components saved as [null, null] (SD3 without T5, SD without safety checker) must be passed as
    # None explicitly, or from_pretrained raises.
    absent = {key: None for key, value in index.items() if isinstance(value, list) and value == [None, None]}
    try:
        return DiffusionPipeline.from_pretrained(str(folder), dtype=torch_dtype, local_files_only=True, **absent)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError(f"could not load the diffusers pipeline in '{folder}': {exc}") from exc


def _from_hub(model_id: str, torch_dtype: torch.dtype) -> Any:
    try:
        return DiffusionPipeline.from_pretrained(model_id, dtype=torch_dtype)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        reason = "HF_HUB_OFFLINE is set" if offline else f"{type(exc).__name__}: {exc}"
        raise ModelLoadError(
            f"model '{model_id}' is not a local folder and could not be fetched from the Hugging Face hub "
            f"({reason}). If this machine cannot reach the hub, download the model elsewhere and pass its "
            "local diffusers folder, e.g. --model /models/stable-diffusion-3.5-medium"
        ) from exc


@dataclass
class PipelineOutput:
    # Per sample: a PIL image, or (video families) the list of its frames.
    images: list[Any]
    # The decoded images (H x W x 3) or videos (F x H x W x 3) as float arrays in [0, 1], before the uint8 rounding.
    arrays: list[Any]


def run_pipeline(
    loaded: LoadedPipeline,
    *,
    prompts: list[str],
    negative_prompts: list[str],
    height: int,
    width: int,
    steps: int,
    guidance_scale: float,
    seeds: list[int],
    on_step: OnStep,
    num_frames: int | None = None,
) -> PipelineOutput:
    """Run one pipeline call: sample i has prompts[i], negative_prompts[i] and seeds[i].

    `on_step` may raise to stop between steps.
    """

    def step_end(_pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        on_step(step, tensors["latents"])
        return tensors

    # CPU generators give the same latents on every device, so a seed means the same image everywhere.
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    call = BatchCall(prompts, negative_prompts, height, width, steps, guidance_scale, generators, step_end, num_frames)
    output = loaded.fresh_pipe()(**loaded.family.call_kwargs(call))
    if loaded.capabilities.output is OutputKind.VIDEO:
        videos = list(output.frames)  # B x (F x H x W x 3)
        to_pil = loaded.pipe.video_processor.numpy_to_pil
        return PipelineOutput(images=[to_pil(video) for video in videos], arrays=videos)
    arrays = list(output.images)
    return PipelineOutput(images=loaded.pipe.image_processor.numpy_to_pil(output.images), arrays=arrays)
