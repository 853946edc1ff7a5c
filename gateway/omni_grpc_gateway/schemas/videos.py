"""POST /v1/videos: vLLM-Omni's video generation, answered with the MP4 inline."""

from __future__ import annotations

from pydantic import BaseModel, Field

from omni_grpc_gateway.schemas.common import GenerationFields
from omni_grpc_gateway.schemas.generation import GenerationInfo


class VideoGenerationRequest(GenerationFields):
    prompt: str
    model: str | None = Field(
        None, description="The base model, or a loaded adapter's name to run with it; other names run the base."
    )


class VideoData(BaseModel):
    b64_json: str = Field(description="The MP4 (H.264), base64.")


class VideosResponse(BaseModel):
    created: int
    data: list[VideoData]
    omni: GenerationInfo
