"""POST /v1/images/generations: the OpenAI Images API, plus the adapter and generation extras."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from omni_grpc_gateway.schemas.common import GenerationFields, OutputFormat, Uint32
from omni_grpc_gateway.schemas.generation import GenerationInfo


class ImageGenerationRequest(GenerationFields):
    prompt: str
    model: str | None = Field(
        None, description="The base model, or a loaded adapter's name to run with it; other names run the base."
    )
    n: Uint32 | None = Field(None, description="Number of images (default 1).")
    response_format: Literal["b64_json"] | None = Field(None, description="Only b64_json: images come inline.")
    stream: bool | None = Field(None, description="Answer server-sent events: partial images, then the images.")
    partial_images: int | None = Field(
        None, ge=0, le=3, description="With stream: up to this many previews (small, at latent resolution) first."
    )
    # OpenAI fields with no meaning for these models: accepted and ignored.
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_compression: int | None = None
    user: str | None = None


class ImageData(BaseModel):
    b64_json: str


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: OutputFormat
    size: str
    omni: GenerationInfo
