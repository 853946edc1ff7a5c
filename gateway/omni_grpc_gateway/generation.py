"""One generation for the chat, images and videos routes: check the route fits the model, resolve `model`,
call Generate (or GenerateStream), note what ran.

The reply names the base model that served it (GenerateResponse.model).
"""

from __future__ import annotations

from fastapi import Request

from omni_grpc.v1 import omni_pb2 as pb
from omni_grpc_gateway.calls import rpc
from omni_grpc_gateway.errors import ApiError
from omni_grpc_gateway.grpc_client import OmniClient
from omni_grpc_gateway.translate import Generation, select_adapter_by_model

_ROUTES = {
    pb.OUTPUT_KIND_IMAGE: "images: POST /v1/images/generations or /v1/chat/completions",
    pb.OUTPUT_KIND_VIDEO: "videos: POST /v1/videos",
}


async def generate(
    client: OmniClient,
    request: Request,
    model: str | None,
    generation: Generation,
    output: pb.OutputKind.ValueType = pb.OUTPUT_KIND_IMAGE,
) -> pb.GenerateResponse:
    await prepare(client, request, model, generation, output)
    response = await rpc(client.generate(generation.request), request=request, params=generation.params)
    note_reply(request, response)
    return response


async def prepare(
    client: OmniClient,
    request: Request,
    model: str | None,
    generation: Generation,
    output: pb.OutputKind.ValueType = pb.OUTPUT_KIND_IMAGE,
) -> pb.GetServerInfoResponse:
    """Refuse a route the model cannot serve, and run an adapter named as the model; the model's info."""
    info = await rpc(client.model_info(), request=request)
    made = info.capabilities.output or pb.OUTPUT_KIND_IMAGE
    if made != output:  # refused before any work: a route for images on a video model, or the reverse
        raise ApiError(400, f"this model ({info.family}) makes {_ROUTES[made]}", param="model")
    if model and not generation.has_adapter:
        # An adapter listed by /v1/models may be named as the model; any other name runs the base model
        # (one server serves one base model, and the guide's curl names its model, whatever is served).
        listing = await rpc(client.list_adapters(), request=request)
        if any(adapter.name == model for adapter in listing.adapters):
            select_adapter_by_model(generation, model)
    return info


def steps_of(generation: Generation, info: pb.GetServerInfoResponse) -> int:
    """The denoising steps the request will run: its own, or the model's default."""
    sampling = generation.request.sampling_params
    return (
        sampling.num_inference_steps if sampling.HasField("num_inference_steps") else info.default_num_inference_steps
    )


def note_reply(request: Request, response: pb.GenerateResponse) -> None:
    """What the access log line says about the reply."""
    request.state.adapter = ",".join(adapter.name for adapter in response.adapters) or "-"
    request.state.images = len(response.images) + len(response.videos)
