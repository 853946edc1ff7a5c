"""POST /v1/images/generations: the OpenAI Images API, answered with b64_json."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse

from omni_grpc_gateway.dependencies import Client
from omni_grpc_gateway.errors import ApiError
from omni_grpc_gateway.generation import generate, prepare, steps_of
from omni_grpc_gateway.routers.responses import GENERATION_ERRORS
from omni_grpc_gateway.schemas.images import ImageData, ImageGenerationRequest, ImagesResponse
from omni_grpc_gateway.streaming import GenerationStream, image_events, preview_every
from omni_grpc_gateway.translate import b64, generation_info, generation_request

router = APIRouter(tags=["images"])


@router.post("/v1/images/generations", responses=GENERATION_ERRORS, response_model=ImagesResponse)
async def create_images(
    body: ImageGenerationRequest, request: Request, client: Client
) -> ImagesResponse | EventSourceResponse:
    """Generate `n` images for `prompt`. Adapters and sampling come in either body shape. With `stream`,
    OpenAI's image streaming events: up to `partial_images` previews, then each image."""
    if body.partial_images and not body.stream:
        raise ApiError(400, "partial_images goes with stream: true", param="partial_images")
    generation = generation_request(body, prompt=body.prompt, prompt_param="prompt", count=body.n, count_param="n")
    if body.stream:
        info = await prepare(client, request, body.model, generation)
        partial = body.partial_images or 0
        stream = await GenerationStream.open(
            client, request, generation, preview_every(steps_of(generation, info), partial)
        )
        output_format = body.output_format or "png"
        return EventSourceResponse(image_events(stream, request, partial_images=partial, output_format=output_format))
    response = await generate(client, request, body.model, generation)
    images = response.images
    return ImagesResponse(
        created=int(time.time()),
        data=[ImageData(b64_json=b64(image)) for image in images],
        output_format=body.output_format or "png",
        size=f"{images[0].width}x{images[0].height}" if images else "",
        omni=generation_info(response),
    )
