"""POST /v1/videos: a video model's generation in vLLM-Omni's shape, answered with the MP4 as b64_json."""

from __future__ import annotations

import base64
import time

from fastapi import APIRouter, Request

from omni_grpc.v1 import omni_pb2 as pb
from omni_grpc_gateway.dependencies import Client
from omni_grpc_gateway.generation import generate
from omni_grpc_gateway.routers.responses import GENERATION_ERRORS
from omni_grpc_gateway.schemas.videos import VideoData, VideoGenerationRequest, VideosResponse
from omni_grpc_gateway.translate import generation_info, generation_request

router = APIRouter(tags=["videos"])


@router.post("/v1/videos", responses=GENERATION_ERRORS)
async def create_videos(body: VideoGenerationRequest, request: Request, client: Client) -> VideosResponse:
    """Generate videos for `prompt` (JSON). Adapters and sampling come in either body shape."""
    generation = generation_request(body, prompt=body.prompt, prompt_param="prompt")
    response = await generate(client, request, body.model, generation, pb.OUTPUT_KIND_VIDEO)
    return VideosResponse(
        created=int(time.time()),
        data=[VideoData(b64_json=base64.b64encode(video.data).decode("ascii")) for video in response.videos],
        omni=generation_info(response),
    )
