"""POST /v1/images/generations: the OpenAI Images API, answered with b64_json."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from omni_grpc_gateway.dependencies import Client
from omni_grpc_gateway.generation import generate
from omni_grpc_gateway.routers.responses import GENERATION_ERRORS
from omni_grpc_gateway.schemas.images import ImageData, ImageGenerationRequest, ImagesResponse
from omni_grpc_gateway.translate import b64, generation_info, generation_request

router = APIRouter(tags=["images"])


@router.post("/v1/images/generations", responses=GENERATION_ERRORS)
async def create_images(body: ImageGenerationRequest, request: Request, client: Client) -> ImagesResponse:
    """Generate `n` images for `prompt`. Adapters and sampling come in either body shape."""
    generation = generation_request(body, prompt=body.prompt, prompt_param="prompt", count=body.n, count_param="n")
    response = await generate(client, request, body.model, generation)
    images = response.images
    return ImagesResponse(
        created=int(time.time()),
        data=[ImageData(b64_json=b64(image)) for image in images],
        output_format=body.output_format or "png",
        size=f"{images[0].width}x{images[0].height}" if images else "",
        omni=generation_info(response),
    )
