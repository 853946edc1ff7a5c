"""Flux.1 (dev and schnell): a transformer on 2x2-packed latents, CLIP-L (pooled) and T5; guidance distilled
into the model as an input (dev; schnell has none), so each sample of a batch takes its own scale; no
negative prompt (the true-CFG mode of diffusers' pipeline is not served)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from omni_grpc.engine.families.base import BatchCall, PackedTransformerFamily
from omni_grpc.engine.guidance import DistilledGuidance, NoGuidance, SampleGuidance
from omni_grpc.engine.types import GuidanceKind

if TYPE_CHECKING:
    from omni_grpc.engine.validation import ValidRequest


class Flux(PackedTransformerFamily):
    name = "flux"
    pipeline_class = "FluxPipeline"
    negative_prompt = False

    def guidance_kind(self, pipe: Any) -> GuidanceKind:
        return GuidanceKind.DISTILLED if pipe.transformer.config.guidance_embeds else GuidanceKind.NONE

    def guidance_hooks(self, pipe: Any) -> SampleGuidance:
        if self.guidance_kind(pipe) is GuidanceKind.NONE:
            return NoGuidance()
        return DistilledGuidance(pipe.transformer)

    def call_kwargs(self, call: BatchCall) -> dict[str, Any]:
        kwargs = super().call_kwargs(call)
        del kwargs["negative_prompt"]  # refused at validation: the family has none
        return kwargs

    def batch_key(self, request: ValidRequest) -> tuple[object, ...]:
        # Every scale rides in one batch: guidance is a per-sample input, and there is no batch doubling.
        return (request.height, request.width, request.steps)
