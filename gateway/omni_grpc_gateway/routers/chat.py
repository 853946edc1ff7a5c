"""POST /v1/chat/completions: a text prompt in, images out as data URLs in the assistant message."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse

from omni_grpc_gateway.dependencies import Client
from omni_grpc_gateway.errors import ApiError
from omni_grpc_gateway.generation import generate, prepare, steps_of
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
from omni_grpc_gateway.streaming import GenerationStream, chat_chunks, preview_every
from omni_grpc_gateway.translate import data_url, generation_info, generation_request, prompt_from_messages

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions", responses=GENERATION_ERRORS, response_model=ChatCompletionResponse)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, client: Client
) -> ChatCompletionResponse | EventSourceResponse:
    """Generate images for the last user message. Adapters and sampling come in either body shape. With
    `stream`, server-sent chat.completion.chunk events tell the progress, the last one holds the images."""
    if body.n not in (None, 1):
        raise ApiError(
            400, "n must be 1; ask for more images with num_outputs_per_prompt or sampling_params.num_images", param="n"
        )
    if body.partial_images and not body.stream:
        raise ApiError(400, "partial_images goes with stream: true", param="partial_images")
    generation = generation_request(body, prompt=prompt_from_messages(body.messages), prompt_param="messages")
    if body.stream:
        info = await prepare(client, request, body.model, generation)
        partial = body.partial_images or 0
        every = preview_every(steps_of(generation, info), partial)
        stream = await GenerationStream.open(client, request, generation, every)
        return EventSourceResponse(chat_chunks(stream, request, info.model, partial_images=partial))
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
