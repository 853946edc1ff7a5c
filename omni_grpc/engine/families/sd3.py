"""Stable Diffusion 3 / 3.5: an MMDiT transformer on 2x2 patches with a position table, CLIP-L, CLIP-G and
(optionally) T5; CFG on a doubled batch; sd-scripts' own Kohya names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from omni_grpc.engine.families.base import Family, Geometry
from omni_grpc.engine.kohya_names import KohyaTable, sd3_pipeline_names


class StableDiffusion3(Family):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoisers = ("transformer",)

    def geometry(self, pipe: Any) -> Geometry:
        config = pipe.transformer.config
        spatial = int(pipe.vae_scale_factor) * int(config.patch_size)
        max_side = int(config.pos_embed_max_size) * spatial if config.pos_embed_max_size else None
        side = int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
        return Geometry(spatial, max_side, side, side)

    def kohya_table(self, denoiser: nn.Module, text_encoders: Mapping[str, nn.Module]) -> KohyaTable:
        return sd3_pipeline_names(denoiser, text_encoders)
