"""Stable Diffusion XL: a UNet with micro-conditioning (the pipeline's default size ids), two CLIP text
encoders whose penultimate states are joined, the second's pooled output; CFG on a doubled batch."""

from __future__ import annotations

from omni_grpc.engine.families.base import Family


class StableDiffusionXL(Family):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    denoisers = ("unet",)
