"""Qwen-Image: an MMDiT transformer on 2x2 patches, the Qwen2.5-VL text encoder; true classifier-free guidance
as a second denoiser pass with the negative prompt (the request's guidance_scale is its `true_cfg_scale`; on,
as in diffusers, only when > 1 and a negative prompt is given), each sample with its own scale in one batch."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from omni_grpc.engine.families.base import BatchCall, PackedTransformerFamily
from omni_grpc.engine.guidance import SampleGuidance, TwoPassCFG
from omni_grpc.engine.types import GuidanceKind

if TYPE_CHECKING:
    from omni_grpc.engine.validation import ValidRequest


class QwenImage(PackedTransformerFamily):
    name = "qwen-image"
    pipeline_class = "QwenImagePipeline"
    text_encoders = ("text_encoder",)
    vae_takes_frames = True

    def guidance_kind(self, pipe: Any) -> GuidanceKind:
        return GuidanceKind.TRUE_CFG

    def guidance_hooks(self, pipe: Any) -> SampleGuidance:
        return TwoPassCFG(pipe.transformer)

    def defaults(self, pipe: Any) -> tuple[int, float]:
        params = inspect.signature(type(pipe).__call__).parameters
        return int(params["num_inference_steps"].default), float(params["true_cfg_scale"].default)

    def call_kwargs(self, call: BatchCall) -> dict[str, Any]:
        kwargs = super().call_kwargs(call)
        guided = call.guidance_scale > 1 and bool(kwargs["negative_prompt"])
        del kwargs["guidance_scale"]  # the distilled input, which Qwen-Image does not have
        kwargs["true_cfg_scale"] = call.guidance_scale if guided else 1.0
        if not guided:
            kwargs["negative_prompt"] = None
        return kwargs

    def batch_key(self, request: ValidRequest) -> tuple[object, ...]:
        # Guided requests (a second pass) and unguided ones run apart; guided ones at any scale together.
        guided = request.guidance_scale > 1 and bool(request.negative_prompt)
        return (request.height, request.width, request.steps, guided)
