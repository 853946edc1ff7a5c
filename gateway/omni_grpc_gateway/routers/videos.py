"""POST /v1/videos: a video model's generation in vLLM-Omni's shape, as JSON or form fields (`curl -F`),
answered with the MP4 as b64_json."""

from __future__ import annotations

import base64
import time
from typing import Any

from fastapi import APIRouter, Request

from omni_grpc.v1 import omni_pb2 as pb
from omni_grpc_gateway.dependencies import Client
from omni_grpc_gateway.form_bodies import JSON_FIELDS, json_or_form
from omni_grpc_gateway.generation import generate
from omni_grpc_gateway.routers.responses import GENERATION_ERRORS
from omni_grpc_gateway.schemas.videos import VideoData, VideoGenerationRequest, VideosResponse
from omni_grpc_gateway.translate import generation_info, generation_request

router = APIRouter(tags=["videos"])
# Takes form fields as well as JSON (the app lets such bodies through to it).
PATH = "/v1/videos"


def _documented_body() -> dict[str, Any]:
    """The body's schema for /openapi.json, in both media types (the route reads the body itself)."""
    schema = VideoGenerationRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)  # the nested models are in components already, from the other generation routes
    form = {
        **schema,
        "properties": {
            key: {"type": "string", "description": f"{key} as JSON text"} if key in JSON_FIELDS else value
            for key, value in schema["properties"].items()
        },
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema},
                "multipart/form-data": {"schema": form},
                "application/x-www-form-urlencoded": {"schema": form},
            },
        }
    }


@router.post(PATH, responses=GENERATION_ERRORS, openapi_extra=_documented_body())
async def create_videos(request: Request, client: Client) -> VideosResponse:
    """Generate videos for `prompt`. Adapters and sampling come in either body shape; as form fields, `lora`,
    `loras`, `lora_request` and `sampling_params` hold JSON text."""
    body = await json_or_form(request, VideoGenerationRequest)
    generation = generation_request(body, prompt=body.prompt, prompt_param="prompt")
    response = await generate(client, request, body.model, generation, pb.OUTPUT_KIND_VIDEO)
    return VideosResponse(
        created=int(time.time()),
        data=[VideoData(b64_json=base64.b64encode(video.data).decode("ascii")) for video in response.videos],
        omni=generation_info(response),
    )
