"""A request's checks and defaults: what arrives becomes a `ValidRequest`, or an InvalidArgument naming the
field and the limit."""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace

from omni_grpc.config import Limits
from omni_grpc.engine.families import GuidanceKind
from omni_grpc.engine.pipeline import LoadedPipeline
from omni_grpc.engine.types import GenerateRequest, LoraRequest
from omni_grpc.errors import InvalidArgument
from omni_grpc.quoting import shown

MAX_SEED = (1 << 64) - 1


@dataclass(frozen=True)
class ValidRequest:
    """A request whose every field is checked, with the model's defaults filled in."""

    prompt: str
    negative_prompt: str
    height: int
    width: int
    steps: int
    guidance_scale: float
    seeds: list[int]
    # Video families: frames per video and the MP4's rate (0 on an image model).
    num_frames: int = 0
    fps: int = 0
    return_frames: bool = False


def validate_request(request: GenerateRequest, pipeline: LoadedPipeline, limits: Limits) -> ValidRequest:
    s = request.sampling
    if not request.prompt.strip():
        raise InvalidArgument("prompt must not be empty", field="prompt")
    for field_name, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        if len(text) > limits.max_prompt_chars:
            raise InvalidArgument(
                f"{field_name} has {len(text)} characters; the limit is {limits.max_prompt_chars}", field=field_name
            )
    family = pipeline.family
    if request.negative_prompt and not family.negative_prompt:
        raise InvalidArgument(
            f"negative_prompt: this model ({family.name}) does not use a negative prompt", field="negative_prompt"
        )
    guidance_kind = family.guidance_kind(pipeline.pipe)
    if s.guidance_scale is not None and guidance_kind is GuidanceKind.NONE:
        raise InvalidArgument(
            f"sampling_params.guidance_scale: this model ({family.name}, {pipeline.model_name}) has no guidance "
            "input; leave it unset",
            field="sampling_params.guidance_scale",
        )
    height = pipeline.default_height if s.height is None else s.height
    width = pipeline.default_width if s.width is None else s.width
    multiple = pipeline.spatial_multiple
    max_side = min(limits.max_side, pipeline.max_side or limits.max_side)
    for field_name, value in (("height", height), ("width", width)):
        if value < multiple or value > max_side or value % multiple:
            raise InvalidArgument(
                f"sampling_params.{field_name} must be a multiple of {multiple} between {multiple} and "
                f"{max_side} for this model, got {value}",
                field=f"sampling_params.{field_name}",
            )
    if height * width > limits.max_pixels:
        raise InvalidArgument(
            f"sampling_params.height x width = {height * width} pixels exceeds the limit of {limits.max_pixels}",
            field="sampling_params.height",
        )
    steps = pipeline.default_steps if s.num_inference_steps is None else s.num_inference_steps
    if not 1 <= steps <= limits.max_steps:
        raise InvalidArgument(
            f"sampling_params.num_inference_steps must be between 1 and {limits.max_steps}, got {steps}",
            field="sampling_params.num_inference_steps",
        )
    guidance = pipeline.default_guidance if s.guidance_scale is None else float(s.guidance_scale)
    if not math.isfinite(guidance) or not 0 <= guidance <= limits.max_guidance_scale:
        raise InvalidArgument(
            f"sampling_params.guidance_scale must be between 0 and {limits.max_guidance_scale}, got {guidance}",
            field="sampling_params.guidance_scale",
        )
    if not 1 <= s.num_images <= limits.max_images:
        raise InvalidArgument(
            f"sampling_params.num_images must be between 1 and {limits.max_images}, got {s.num_images}",
            field="sampling_params.num_images",
        )
    num_frames, fps = _frames(request, pipeline)
    rule = pipeline.capabilities.frames
    # A video costs its latent frames (each the work of one image of its size).
    work = steps * s.num_images * height * width / 2**20 * (rule.latent_frames(num_frames) if rule else 1)
    if work > limits.max_request_work:
        raise InvalidArgument(
            f"the request asks for {work:g} megapixel-steps (steps x images x height x width / 2^20); the limit "
            f"is {limits.max_request_work} (--max-request-work)",
            field="sampling_params.num_inference_steps",
        )
    seed = secrets.randbits(63) if s.seed is None else s.seed
    if not 0 <= seed <= MAX_SEED - (s.num_images - 1):
        raise InvalidArgument(
            f"sampling_params.seed must be between 0 and 2^64-1 - (num_images-1), got {seed}",
            field="sampling_params.seed",
        )
    return ValidRequest(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        height=height,
        width=width,
        steps=steps,
        guidance_scale=guidance,
        seeds=[seed + i for i in range(s.num_images)],
        num_frames=num_frames,
        fps=fps,
        return_frames=request.return_frames,
    )


MAX_FPS = 120


def _frames(request: GenerateRequest, pipeline: LoadedPipeline) -> tuple[int, int]:
    """Frames and fps of a video request, checked against the family's rule; (0, 0) on an image model."""
    s, rule, family = request.sampling, pipeline.capabilities.frames, pipeline.family.name
    if rule is None:
        for field_name, given in (
            ("sampling_params.num_frames", s.num_frames is not None),
            ("sampling_params.fps", s.fps is not None),
            ("return_frames", request.return_frames),
        ):
            if given:
                raise InvalidArgument(f"{field_name}: this model ({family}) makes images, not videos", field=field_name)
        return 0, 0
    frames = rule.default_frames if s.num_frames is None else s.num_frames
    if not rule.min_frames <= frames <= rule.max_frames or (frames - rule.min_frames) % rule.step:
        raise InvalidArgument(
            f"sampling_params.num_frames must be {rule.min_frames} + {rule.step}k frames, at most {rule.max_frames}, "
            f"for this model ({family}), got {frames}",
            field="sampling_params.num_frames",
        )
    fps = rule.default_fps if s.fps is None else s.fps
    if not 1 <= fps <= MAX_FPS:
        raise InvalidArgument(
            f"sampling_params.fps must be between 1 and {MAX_FPS}, got {fps}", field="sampling_params.fps"
        )
    return frames, fps


def requested_adapters(
    request: GenerateRequest, limits: Limits, experts: Sequence[str]
) -> list[tuple[str, LoraRequest]]:
    """The adapters a request asks for, each with the field that names it ("lora_request", "loras[1]"), their
    experts checked against the model's (`experts`, the default first) and "" for the default."""
    if request.lora is not None and request.loras:
        raise InvalidArgument(
            "give lora_request or loras, not both (lora_request is the same as a one-element loras)", field="loras"
        )
    if request.lora is not None:
        requested = [("lora_request", request.lora)]
    else:
        if len(request.loras) > limits.max_loras_per_request:
            raise InvalidArgument(
                f"loras has {len(request.loras)} adapters; the limit is {limits.max_loras_per_request} "
                "(--max-loras-per-request)",
                field="loras",
            )
        requested = [(f"loras[{i}]", lora) for i, lora in enumerate(request.loras)]
    for field_name, lora in requested:
        check_lora_scale(lora, limits, field_name)
    return [
        (field_name, replace(lora, expert=resolve_expert(lora.expert, experts, f"{field_name}.expert")))
        for field_name, lora in requested
    ]


def resolve_expert(expert: str | None, experts: Sequence[str], field_name: str = "expert") -> str | None:
    """An adapter's expert as the table keys it: "" for the model's first denoiser, None when not given."""
    if not expert:
        return None
    if expert not in experts:
        if len(experts) == 1:
            raise InvalidArgument(
                f"{field_name} {shown(expert)}: this model has one denoiser ({experts[0]}); an expert is chosen "
                "only on models with several (Wan 2.2)",
                field=field_name,
            )
        raise InvalidArgument(
            f"{field_name} {shown(expert)} is not a denoiser of this model; it has {experts[0]} (the default), "
            + ", ".join(experts[1:]),
            field=field_name,
        )
    return "" if expert == experts[0] else expert


def check_lora_scale(lora: LoraRequest, limits: Limits, field_name: str = "lora_request") -> None:
    bound = limits.max_lora_scale
    if not math.isfinite(lora.scale) or abs(lora.scale) > bound:
        raise InvalidArgument(
            f"{field_name}.scale must be a finite number between -{bound:g} and {bound:g}, got {lora.scale}",
            field=f"{field_name}.scale",
        )
