"""The model families the server serves, one module each; `family_of` finds a pipeline's."""

from __future__ import annotations

from typing import Any

from omni_grpc.engine.families.base import Capabilities, Family, Geometry
from omni_grpc.engine.families.flux import Flux
from omni_grpc.engine.families.qwen_image import QwenImage
from omni_grpc.engine.families.sd import StableDiffusion
from omni_grpc.engine.families.sd3 import StableDiffusion3
from omni_grpc.engine.families.sdxl import StableDiffusionXL
from omni_grpc.engine.families.wan import Wan
from omni_grpc.engine.types import GuidanceKind, OutputKind

# Pipeline class name -> its family.
FAMILIES: dict[str, Family] = {
    f.pipeline_class: f
    for f in (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux(), QwenImage(), Wan())
}

__all__ = ["FAMILIES", "Capabilities", "Family", "Geometry", "GuidanceKind", "OutputKind", "family_of"]


def family_of(pipe: Any) -> Family | None:
    return FAMILIES.get(type(pipe).__name__)
