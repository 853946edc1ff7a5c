"""What a model family is: everything the engine needs to know about one kind of diffusers pipeline.

A family is described once, in its own module (`families/<name>.py`); the engine, the adapter table and the
service ask the family and never branch on its name.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from omni_grpc.engine.guidance import BatchedCFG, SampleGuidance
from omni_grpc.engine.kohya_names import KohyaTable, transformer_pipeline_names
from omni_grpc.engine.types import GuidanceKind, OutputKind

if TYPE_CHECKING:
    from omni_grpc.engine.validation import ValidRequest


@dataclass(frozen=True)
class Geometry:
    # Height and width must be multiples of this.
    spatial_multiple: int
    # Largest height or width the denoiser can take (SD3's position table bounds it); None: no bound.
    max_side: int | None
    default_height: int
    default_width: int


@dataclass(frozen=True)
class FrameRule:
    """A video family's frames: min_frames + k * step up to max_frames (each step is one latent frame)."""

    min_frames: int
    step: int
    max_frames: int
    default_frames: int
    default_fps: int

    def latent_frames(self, frames: int) -> int:
        return (frames - self.min_frames) // self.step + 1


@dataclass(frozen=True)
class Capabilities:
    """What a served model can do, as GetServerInfo reports it."""

    output: OutputKind
    negative_prompt: bool
    guidance: GuidanceKind
    # Video families only.
    frames: FrameRule | None = None
    # The denoisers adapters may go into, the default first.
    experts: tuple[str, ...] = ()


@dataclass
class BatchCall:
    """One pipeline call for a batch, in plain values: sample i has prompts[i], negative_prompts[i], seeds[i]."""

    prompts: list[str]
    negative_prompts: list[str]
    height: int
    width: int
    steps: int
    guidance_scale: float
    generators: list[torch.Generator]
    on_step_end: Callable[..., dict[str, Any]]
    # Video families only.
    num_frames: int | None = None


class Family:
    """The defaults are Stable Diffusion's (1.x/2.x); each family overrides what differs."""

    name: ClassVar[str]
    pipeline_class: ClassVar[str]
    # The denoiser components, the first being the one that runs every step.
    denoisers: ClassVar[tuple[str, ...]]
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2", "text_encoder_3")
    output: ClassVar[OutputKind] = OutputKind.IMAGE
    negative_prompt: ClassVar[bool] = True
    frames: ClassVar[FrameRule | None] = None
    # The VAE decodes videos (B x C x F x h x w), pictures being one-frame videos (Wan, Qwen-Image).
    vae_takes_frames: ClassVar[bool] = False

    def guidance_kind(self, pipe: Any) -> GuidanceKind:
        return GuidanceKind.CFG

    def experts(self, pipe: Any) -> tuple[str, ...]:
        """The denoisers this pipeline has (Wan 2.1 leaves transformer_2 empty), the default first."""
        return tuple(name for name in self.denoisers if getattr(pipe, name, None) is not None)

    def defaults(self, pipe: Any) -> tuple[int, float]:
        """Steps and guidance strength when a request leaves them unset: the pipeline's own."""
        params = inspect.signature(type(pipe).__call__).parameters
        return int(params["num_inference_steps"].default), float(params["guidance_scale"].default)

    def guidance_hooks(self, pipe: Any) -> SampleGuidance:
        return BatchedCFG(getattr(pipe, self.denoisers[0]))

    def geometry(self, pipe: Any) -> Geometry:
        # The UNet pipelines refuse sizes that are not multiples of 8, whatever their VAE.
        vae = int(pipe.vae_scale_factor)
        sample = int(getattr(pipe, "default_sample_size", None) or getattr(pipe, self.denoisers[0]).config.sample_size)
        return Geometry(math.lcm(vae, 8), None, sample * vae, sample * vae)

    def kohya_table(self, denoiser: nn.Module, text_encoders: Mapping[str, nn.Module]) -> KohyaTable:
        from omni_grpc.engine.kohya_names import unet_pipeline_names

        return unet_pipeline_names(denoiser, text_encoders)

    def call_kwargs(self, call: BatchCall) -> dict[str, Any]:
        """The pipeline's keyword arguments for one batch."""
        return {
            "prompt": call.prompts,
            # Only a batch where no sample has one goes without: SDXL encodes "none" as zeros, for a whole call.
            "negative_prompt": call.negative_prompts if any(call.negative_prompts) else None,
            "height": call.height,
            "width": call.width,
            "num_inference_steps": call.steps,
            "guidance_scale": call.guidance_scale,
            "num_images_per_prompt": 1,
            "generator": call.generators,
            "output_type": "np",
            "callback_on_step_end": call.on_step_end,
        }

    def batch_key(self, request: ValidRequest) -> tuple[object, ...]:
        """Requests with equal keys may share a denoising batch. Here guidance scales may differ, guidance on
        or off may not (off does not double the batch); nor may a negative prompt or none (SDXL encodes "none"
        as zeros, which it can only do for a whole batch)."""
        return (request.height, request.width, request.steps, request.guidance_scale > 1, bool(request.negative_prompt))

    def latent_grid(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The denoiser's latents as B x C x h x w pictures (a video's: its first latent frame)."""
        return latents[:, :, 0] if latents.ndim == 5 else latents

    def decode_latent_grid(self, pipe: Any, grid: torch.Tensor) -> torch.Tensor:
        """What the VAE makes of latent pictures (B x C x h x w, as the denoiser sees them): B x 3 x H x W in
        [-1, 1]. The pipelines' own rule for the VAE's space: its mean and std where it has them (Wan,
        Qwen-Image), else its scaling and shift factors."""
        config = pipe.vae.config
        mean = getattr(config, "latents_mean", None)
        std = getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, grid.shape[1], 1, 1)
            grid = grid * torch.tensor(std, dtype=grid.dtype, device=grid.device).view(shape)
            grid = grid + torch.tensor(mean, dtype=grid.dtype, device=grid.device).view(shape)
        else:
            grid = grid / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        if self.vae_takes_frames:
            video: torch.Tensor = pipe.vae.decode(grid[:, :, None], return_dict=False)[0]
            return video[:, :, 0]
        picture: torch.Tensor = pipe.vae.decode(grid, return_dict=False)[0]
        return picture

    def capabilities(self, pipe: Any) -> Capabilities:
        return Capabilities(
            self.output, self.negative_prompt, self.guidance_kind(pipe), self.frames, experts=self.experts(pipe)
        )


class PackedTransformerFamily(Family):
    """Transformer families on 2x2-packed (or 2x2-patched) latents whose pipelines fix the default side at 1024
    (Flux, Qwen-Image), with Kohya files in diffusers' module names."""

    denoisers = ("transformer",)

    def geometry(self, pipe: Any) -> Geometry:
        vae = int(pipe.vae_scale_factor)
        side = int(pipe.default_sample_size) * vae
        return Geometry(vae * 2, None, side, side)

    def kohya_table(self, denoiser: nn.Module, text_encoders: Mapping[str, nn.Module]) -> KohyaTable:
        return transformer_pipeline_names(denoiser, text_encoders)

    def latent_grid(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        # Tokens of 2x2 patches, unpacked by the pipeline's own method, as it does before its VAE.
        unpacked = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)  # noqa: SLF001
        return super().latent_grid(pipe, unpacked, height, width)
