"""Wan 2.1 / 2.2 text-to-video: a 3D transformer on (1, 2, 2) patches over an 8x/4x video VAE, UMT5; classifier-
free guidance as two passes (cond, then uncond) with per-sample scales in one batch. Wan 2.2 has two experts:
`transformer` for the high-noise steps, `transformer_2` for the low-noise ones (both guided)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from omni_grpc.engine.families.base import BatchCall, Family, FrameRule, Geometry
from omni_grpc.engine.guidance import SampleGuidance, TwoPassCFG
from omni_grpc.engine.kohya_names import KohyaTable, transformer_pipeline_names
from omni_grpc.engine.types import OutputKind

if TYPE_CHECKING:
    from omni_grpc.engine.validation import ValidRequest


class Wan(Family):
    name = "wan"
    pipeline_class = "WanPipeline"
    denoisers = ("transformer", "transformer_2")
    text_encoders = ("text_encoder",)
    output = OutputKind.VIDEO
    vae_takes_frames = True
    # 4k + 1 frames (the VAE compresses 4 frames into one latent frame, the first alone); 81 at 16 fps by default.
    frames = FrameRule(min_frames=1, step=4, max_frames=257, default_frames=81, default_fps=16)

    def guidance_hooks(self, pipe: Any) -> SampleGuidance:
        experts = [expert for expert in (pipe.transformer, getattr(pipe, "transformer_2", None)) if expert is not None]
        return TwoPassCFG(*experts)

    def geometry(self, pipe: Any) -> Geometry:
        spatial = int(pipe.vae_scale_factor_spatial) * int(pipe.transformer.config.patch_size[1])
        return Geometry(spatial, None, 480, 832)  # the pipeline's defaults, Wan 2.1's 480p

    def kohya_table(self, denoiser: nn.Module, text_encoders: Mapping[str, nn.Module]) -> KohyaTable:
        return transformer_pipeline_names(denoiser, text_encoders)

    def call_kwargs(self, call: BatchCall) -> dict[str, Any]:
        kwargs = super().call_kwargs(call)
        del kwargs["num_images_per_prompt"]  # the video pipeline names it num_videos_per_prompt
        kwargs["num_videos_per_prompt"] = 1
        kwargs["num_frames"] = call.num_frames
        return kwargs

    def batch_key(self, request: ValidRequest) -> tuple[object, ...]:
        # Guidance on or off changes the passes per step; scales, negative prompts (none is "") batch together.
        return (request.height, request.width, request.steps, request.num_frames, request.guidance_scale > 1)
