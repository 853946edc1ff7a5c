"""Conversions between protobuf messages and the engine's plain types. Nothing else."""

from __future__ import annotations

import functools
import importlib.metadata
from typing import TYPE_CHECKING, Any, TypedDict

from google.protobuf.message import Message

from omni_grpc.engine.progress import ProgressEvent, Queued, Started, Step
from omni_grpc.engine.types import (
    AdapterFormat,
    AdapterInfo,
    AppliedAdapter,
    GeneratedImage,
    GenerateRequest,
    GenerateResult,
    GuidanceKind,
    LoraRequest,
    OutputFormat,
    OutputKind,
    SamplingParams,
)
from omni_grpc.errors import InvalidArgument
from omni_grpc.v1 import omni_pb2 as pb

if TYPE_CHECKING:
    from omni_grpc.engine.pipeline import LoadedPipeline

_OUTPUT_FORMATS = {
    pb.OUTPUT_FORMAT_UNSPECIFIED: OutputFormat.PNG,
    pb.OUTPUT_FORMAT_PNG: OutputFormat.PNG,
    pb.OUTPUT_FORMAT_JPEG: OutputFormat.JPEG,
    pb.OUTPUT_FORMAT_WEBP: OutputFormat.WEBP,
}
_TIERS = {"device": pb.ADAPTER_TIER_DEVICE, "host": pb.ADAPTER_TIER_HOST, "disk": pb.ADAPTER_TIER_DISK}
_ADAPTER_FORMATS = {
    AdapterFormat.PEFT: pb.ADAPTER_FORMAT_PEFT,
    AdapterFormat.DIFFUSERS: pb.ADAPTER_FORMAT_DIFFUSERS,
    AdapterFormat.KOHYA: pb.ADAPTER_FORMAT_KOHYA,
    AdapterFormat.LYCORIS: pb.ADAPTER_FORMAT_LYCORIS,
    AdapterFormat.DIFFUSERS_OLD: pb.ADAPTER_FORMAT_DIFFUSERS_OLD,
}


def _optional(message: Message, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def generate_request_from_pb(request: pb.GenerateRequest) -> GenerateRequest:
    if request.output_format not in _OUTPUT_FORMATS:
        raise InvalidArgument(
            f"output_format {request.output_format} is not a known OutputFormat", field="output_format"
        )
    sp = request.sampling_params
    sampling = SamplingParams(
        height=_optional(sp, "height"),
        width=_optional(sp, "width"),
        num_inference_steps=_optional(sp, "num_inference_steps"),
        guidance_scale=_optional(sp, "guidance_scale"),
        seed=_optional(sp, "seed"),
        num_images=sp.num_images if sp.HasField("num_images") else 1,
        num_frames=sp.num_frames if sp.HasField("num_frames") else None,
        fps=sp.fps if sp.HasField("fps") else None,
    )
    return GenerateRequest(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        sampling=sampling,
        lora=_lora_from_pb(request.lora_request) if request.HasField("lora_request") else None,
        loras=[_lora_from_pb(lora) for lora in request.loras],
        output_format=_OUTPUT_FORMATS[request.output_format],
        return_frames=request.return_frames,
    )


def _lora_from_pb(lora: pb.LoraRequest) -> LoraRequest:
    return LoraRequest(
        path=lora.path or None,
        name=lora.name or None,
        id=_optional(lora, "id"),
        scale=lora.scale if lora.HasField("scale") else 1.0,
        expert=lora.expert or None,
    )


def _image_to_pb(img: GeneratedImage) -> pb.Image:
    return pb.Image(
        data=img.data or b"", mime_type=img.mime_type or "", width=img.width, height=img.height, seed=img.seed
    )


def _applied_to_pb(a: AppliedAdapter) -> pb.AppliedAdapter:
    return pb.AppliedAdapter(id=a.id, name=a.name, path=a.path, scale=a.scale, expert=a.expert)


def progress_event_to_pb(event: ProgressEvent) -> pb.GenerateEvent:
    if isinstance(event, Queued):
        return pb.GenerateEvent(queued=pb.QueuedEvent(position=event.position))
    if isinstance(event, Started):
        adapters = [_applied_to_pb(a) for a in event.adapters]
        return pb.GenerateEvent(started=pb.StartedEvent(batch_size=event.batch_size, adapters=adapters))
    if isinstance(event, Step):
        step = pb.StepEvent(step=event.step, total_steps=event.total_steps, elapsed_ms=event.elapsed_ms)
        return pb.GenerateEvent(step=step)
    images = [_image_to_pb(img) for img in event.images]
    return pb.GenerateEvent(preview=pb.PreviewEvent(step=event.step, images=images))


def generate_response_to_pb(result: GenerateResult) -> pb.GenerateResponse:
    response = pb.GenerateResponse(
        images=[_image_to_pb(img) for img in result.images],
        timings=pb.Timings(
            queue_ms=result.timings.queue_ms,
            adapter_ms=result.timings.adapter_ms,
            inference_ms=result.timings.inference_ms,
            encode_ms=result.timings.encode_ms,
            total_ms=result.timings.total_ms,
        ),
        num_inference_steps=result.num_inference_steps,
        guidance_scale=result.guidance_scale,
        batch_size=result.batch_size,
        model=result.model,
        adapters=[_applied_to_pb(a) for a in result.adapters],
        videos=[
            pb.Video(
                data=video.data or b"",
                mime_type=video.mime_type or "",
                width=video.width,
                height=video.height,
                num_frames=video.num_frames,
                fps=video.fps,
                seed=video.seed,
                frames=[
                    pb.Image(data=png, mime_type="image/png", width=video.width, height=video.height, seed=video.seed)
                    for png in video.frame_data
                ],
            )
            for video in result.videos
        ],
    )
    if result.adapter is not None:
        response.adapter.CopyFrom(response.adapters[0])
    return response


def adapter_to_pb(info: AdapterInfo, *, show_path: bool = True) -> pb.Adapter:
    return pb.Adapter(
        id=info.id,
        name=info.name,
        path=info.path if show_path else "",
        rank=info.rank,
        alpha=info.alpha,
        target_modules=info.target_modules,
        pinned=info.pinned,
        size_bytes=info.size_bytes,
        load_time_ms=info.load_time_ms,
        use_count=info.use_count,
        in_use=info.in_use,
        loads=info.loads,
        format=_ADAPTER_FORMATS[info.format],
        num_layers=info.num_layers,
        tier=_TIERS[info.tier],
        hits=info.hits,
        promotions=info.promotions,
        evictions=info.evictions,
        components=info.components,
        version=info.version,
        expert=info.expert,
    )


class UnloadSelector(TypedDict, total=False):
    """Engine.unload_adapter's keyword arguments: exactly one of the first three (an expert goes with a path)."""

    adapter_id: int
    name: str
    path: str
    expert: str | None


def unload_selector_from_pb(request: pb.UnloadAdapterRequest) -> UnloadSelector:
    which = request.WhichOneof("adapter")
    if request.expert and which != "path":
        raise InvalidArgument("expert goes with a path: an id or a name names one adapter already", field="expert")
    if which == "id":
        return {"adapter_id": request.id}
    if which == "name":
        return {"name": request.name}
    if which == "path":
        return {"path": request.path, "expert": request.expert or None}
    raise InvalidArgument("UnloadAdapterRequest needs one of id, name or path", field="adapter")


_OUTPUT_KINDS = {OutputKind.IMAGE: pb.OUTPUT_KIND_IMAGE, OutputKind.VIDEO: pb.OUTPUT_KIND_VIDEO}
_GUIDANCE_KINDS = {
    GuidanceKind.CFG: pb.GUIDANCE_KIND_CFG,
    GuidanceKind.DISTILLED: pb.GUIDANCE_KIND_DISTILLED,
    GuidanceKind.NONE: pb.GUIDANCE_KIND_NONE,
    GuidanceKind.TRUE_CFG: pb.GUIDANCE_KIND_TRUE_CFG,
}


def _frame_capabilities(pipeline: LoadedPipeline) -> dict[str, int]:
    rule = pipeline.capabilities.frames
    if rule is None:
        return {}
    return {
        "min_frames": rule.min_frames,
        "max_frames": rule.max_frames,
        "frame_step": rule.step,
        "default_frames": rule.default_frames,
        "default_fps": rule.default_fps,
    }


def server_info_to_pb(pipeline: LoadedPipeline, *, started_at: int) -> pb.GetServerInfoResponse:
    return pb.GetServerInfoResponse(
        model=pipeline.model_name,
        family=pipeline.family.name,
        capabilities=pb.Capabilities(
            output=_OUTPUT_KINDS[pipeline.capabilities.output],
            negative_prompt=pipeline.capabilities.negative_prompt,
            guidance=_GUIDANCE_KINDS[pipeline.capabilities.guidance],
            experts=pipeline.capabilities.experts,
            **_frame_capabilities(pipeline),
        ),
        default_height=pipeline.default_height,
        default_width=pipeline.default_width,
        default_num_inference_steps=pipeline.default_steps,
        default_guidance_scale=pipeline.default_guidance,
        spatial_multiple=pipeline.spatial_multiple,
        started_at=started_at,
        version=_version(),
    )


@functools.cache
def _version() -> str:
    try:
        return importlib.metadata.version("omni-grpc")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"
