"""What a generation reply says beyond the images: seeds, adapter, timings (the `omni` extension field)."""

from __future__ import annotations

from pydantic import BaseModel


class AppliedAdapterOut(BaseModel):
    id: int
    name: str
    path: str
    scale: float
    expert: str = ""


class TimingsOut(BaseModel):
    queue_ms: float
    adapter_ms: float
    inference_ms: float
    encode_ms: float
    total_ms: float


class GenerationInfo(BaseModel):
    # One seed per image: rerun with the first one (and the same fields) to get the same images.
    seeds: list[int]
    # The adapter applied, when exactly one was; all of them, in request order, in `adapters`.
    adapter: AppliedAdapterOut | None
    adapters: list[AppliedAdapterOut]
    num_inference_steps: int
    guidance_scale: float
    # Images in the denoising batch this request shared.
    batch_size: int
    timings: TimingsOut
