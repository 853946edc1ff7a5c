"""Stable Diffusion 1.x / 2.x: a UNet, one CLIP text encoder, classifier-free guidance on a doubled batch."""

from __future__ import annotations

from omni_grpc.engine.families.base import Family


class StableDiffusion(Family):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    denoisers = ("unet",)
