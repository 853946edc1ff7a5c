"""POST /v1/chat/completions: the prompt comes from the messages, the images go back as data URLs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from omni_grpc_gateway.schemas.common import GenerationFields
from omni_grpc_gateway.schemas.generation import GenerationInfo


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # Other message fields (tool calls, ...) play no part in an image and are ignored.
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(GenerationFields):
    """The prompt is the text of the last user message; generation fields come in either shape."""

    model: str | None = Field(
        None, description="The base model, or a loaded adapter's name to run with it; other names run the base."
    )
    messages: list[ChatMessage] = Field(min_length=1)
    # OpenAI chat fields that mean nothing for an image: accepted so that standard clients work.
    stream: bool | None = Field(
        None, description="Answer chat.completion.chunk events: progress in `omni`, the images in the last one."
    )
    partial_images: int | None = Field(
        None, ge=0, le=3, description="With stream: up to this many previews in the chunks' `omni` (an extension)."
    )
    n: int | None = Field(None, description="Must be 1; ask for more images with num_outputs_per_prompt.")
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    user: str | None = None
    stop: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    metadata: dict[str, str] | None = None


class ImageUrl(BaseModel):
    url: str


class ImageContent(BaseModel):
    type: Literal["image_url"] = "image_url"
    image_url: ImageUrl


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: list[ImageContent]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop"] = "stop"
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    omni: GenerationInfo
