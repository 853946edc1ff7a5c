"""Streamed generations as server-sent events (sse-starlette), from the server's GenerateStream:

- chat (`"stream": true`): OpenAI's `chat.completion.chunk` objects, the progress (queue place, batch start,
  steps, previews) in each chunk's `omni`, the images in the last chunk's content, then `[DONE]`;
- images (`"stream": true`, `"partial_images": N`): OpenAI's `image_generation.partial_image` events (the
  server's previews, up to N), then one `image_generation.completed` per image.

A failure before the first event is the route's usual JSON error; after it, an `error` event with the same
error object (what OpenAI's client raises). A client that leaves cancels the gRPC call: the work stops.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from fastapi import Request

from omni_grpc.v1 import omni_pb2 as pb
from omni_grpc_gateway.calls import rpc
from omni_grpc_gateway.errors import ApiError, error_object, from_rpc_error
from omni_grpc_gateway.generation import note_reply
from omni_grpc_gateway.grpc_client import OmniClient
from omni_grpc_gateway.translate import Generation, b64, data_url, generation_info

Event = dict[str, str]


class GenerationStream:
    """A GenerateStream call whose first event has come (so that an early refusal is a plain JSON error)."""

    def __init__(
        self,
        call: grpc.aio.UnaryStreamCall[pb.GenerateStreamRequest, pb.GenerateEvent],
        first: pb.GenerateEvent,
        params: Mapping[str, str],
    ) -> None:
        self._call = call
        self._first = first
        self._params = params

    @classmethod
    async def open(
        cls, client: OmniClient, request: Request, generation: Generation, preview_every_steps: int
    ) -> GenerationStream:
        call = client.generate_stream(generation.request, preview_every_steps)
        try:
            first = await rpc(_next(call), request=request, params=generation.params)
        except BaseException:
            call.cancel()
            raise
        return cls(call, first, generation.params)

    async def events(self) -> AsyncIterator[pb.GenerateEvent]:
        try:
            yield self._first
            while True:
                try:
                    event = await _next(self._call)
                except grpc.aio.AioRpcError as exc:
                    raise from_rpc_error(exc, self._params) from None
                yield event
                if event.HasField("result"):
                    return
        finally:
            self._call.cancel()  # a no-op once the call ended; else the client left: stop the work


async def _next(call: grpc.aio.UnaryStreamCall[pb.GenerateStreamRequest, pb.GenerateEvent]) -> pb.GenerateEvent:
    event = await call.read()
    if event is grpc.aio.EOF:  # the server ends every stream with its result or a status
        raise ApiError(502, "the gRPC server ended the stream without a result")
    assert isinstance(event, pb.GenerateEvent)
    return event


def progress_of(event: pb.GenerateEvent) -> dict[str, Any]:
    """An event other than the result, as the `omni` object of a chunk."""
    if event.HasField("queued"):
        return {"event": "queued", "position": event.queued.position}
    if event.HasField("started"):
        started = event.started
        return {"event": "started", "batch_size": started.batch_size, "adapters": [a.name for a in started.adapters]}
    if event.HasField("step"):
        step = event.step
        return {"event": "step", "step": step.step, "total_steps": step.total_steps, "elapsed_ms": step.elapsed_ms}
    preview = event.preview
    return {"event": "preview", "step": preview.step, "images": [data_url(image) for image in preview.images]}


async def chat_chunks(
    stream: GenerationStream, request: Request, model: str, *, partial_images: int
) -> AsyncIterator[Event]:
    chunk_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def chunk(delta: dict[str, Any], omni: dict[str, Any], finish: str | None = None) -> Event:
        body = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            "omni": omni,
        }
        return {"data": json.dumps(body)}

    first = True
    previews = 0
    try:
        async for event in stream.events():
            if event.HasField("preview"):
                previews += 1
                if previews > partial_images:
                    continue
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            first = False
            if not event.HasField("result"):
                yield chunk(delta, progress_of(event))
                continue
            response = event.result
            note_reply(request, response)
            content = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in response.images]
            yield chunk({**delta, "content": content}, generation_info(response).model_dump(), "stop")
        yield {"data": "[DONE]"}
    except ApiError as exc:
        yield _error_event(exc)


def preview_every(steps: int, partial_images: int) -> int:
    """Steps between previews so that `partial_images` of them come before the last step (where there are that
    many steps; the events stop at `partial_images`)."""
    return max(1, steps // (partial_images + 1)) if partial_images else 0


async def image_events(
    stream: GenerationStream, request: Request, *, partial_images: int, output_format: str
) -> AsyncIterator[Event]:
    def event(kind: str, image: pb.Image, **extra: Any) -> Event:
        body = {
            "type": f"image_generation.{kind}",
            "b64_json": b64(image),
            "created_at": int(time.time()),
            "size": f"{image.width}x{image.height}",
            "quality": "auto",
            "background": "auto",
            "output_format": output_format if kind == "completed" else "png",
            **extra,
        }
        return {"event": body["type"], "data": json.dumps(body)}

    sent = 0
    try:
        async for item in stream.events():
            if item.HasField("preview") and sent < partial_images:
                for image in item.preview.images:
                    yield event("partial_image", image, partial_image_index=sent)
                sent += 1
            elif item.HasField("result"):
                response = item.result
                note_reply(request, response)
                usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "input_tokens_details": {}}
                omni = generation_info(response).model_dump()
                for image in response.images:
                    yield event("completed", image, usage=usage, omni=omni)
    except ApiError as exc:
        yield _error_event(exc)


def _error_event(exc: ApiError) -> Event:
    return {"event": "error", "data": json.dumps(error_object(exc.status_code, str(exc.detail), exc.param, exc.code))}
