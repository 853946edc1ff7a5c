"""POST /v1/chat/completions: a text prompt in, images out as data URLs in the assistant message."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from omni_grpc_gateway.dependencies import Client
from omni_grpc_gateway.errors import ApiError
from omni_grpc_gateway.generation import generate
from omni_grpc_gateway.routers.responses import GENERATION_ERRORS
from omni_grpc_gateway.schemas.chat import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ImageContent,
    ImageUrl,
    Usage,
)
from omni_grpc_gateway.translate import data_url, generation_info, generation_request, prompt_from_messages

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions", responses=GENERATION_ERRORS)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, client: Client
) -> ChatCompletionResponse:
    """Generate images for the last user message. Adapters and sampling come in either body shape."""
    if body.stream:
        raise ApiError(400, "stream is not supported: images are returned whole", param="stream")
    if body.n not in (None, 1):
        raise ApiError(
            400, "n must be 1; ask for more images with num_outputs_per_prompt or sampling_params.num_images", param="n"
        )
    generation = generation_request(body, prompt=prompt_from_messages(body.messages), prompt_param="messages")
    response = await generate(client, request, body.model, generation)
    content = [ImageContent(image_url=ImageUrl(url=data_url(image))) for image in response.images]
    return ChatCompletionResponse(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=response.model,
        choices=[ChatChoice(index=0, message=AssistantMessage(content=content))],
        usage=Usage(),
        omni=generation_info(response),
    )
