"""GenerateStream over a real server: the queue, the batch, each step and previews, then the very reply that
Generate gives; each stream of a mixed batch sees its own samples; closing the stream stops the work. And the
gateway's server-sent events (chat chunks, OpenAI image streaming) as the official openai client reads them."""

from __future__ import annotations

import io
import itertools
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from omni_grpc.v1 import omni_pb2 as pb
from tests.helpers import InProcessGateway, InProcessServer, start_server

STEPS = 6


@pytest.fixture(scope="module")
def streaming(cache_root: Path, style_a: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    srv = start_server(
        ["--cache-dir", str(cache_root), "--lora-dirs", str(style_a.parent), "--max-running-batches", "1"],
        log_path=tmp_path_factory.mktemp("logs") / "streaming.log",
    )
    yield srv
    srv.stop()


def request(seed: int, adapter: Path | None = None, steps: int = STEPS) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(height=64, width=64, num_inference_steps=steps, seed=seed)
    lora = pb.LoraRequest(path=str(adapter)) if adapter is not None else None
    return pb.GenerateRequest(prompt="a red chair", sampling_params=sampling, lora_request=lora)


def stream(server: InProcessServer, req: pb.GenerateRequest, every: int = 2) -> list[pb.GenerateEvent]:
    call = server.stub.GenerateStream(pb.GenerateStreamRequest(request=req, preview_every_steps=every), timeout=120)
    return list(call)


def kinds(events: list[pb.GenerateEvent]) -> list[str]:
    return [str(event.WhichOneof("event")) for event in events]


def pixels(image: pb.Image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.data)), dtype=int)


def test_a_stream_tells_each_stage_and_ends_with_generates_reply(streaming: InProcessServer, style_a: Path) -> None:
    events = stream(streaming, request(3, style_a))
    assert kinds(events) == ["queued", "started"] + ["step", "step", "preview"] * 2 + ["step", "step", "result"]
    assert events[0].queued.position == 0
    started = events[1].started
    assert started.batch_size == 1 and [a.path for a in started.adapters] == [str(style_a)]
    steps = [event.step for event in events if event.HasField("step")]
    assert [(s.step, s.total_steps) for s in steps] == [(n, STEPS) for n in range(1, STEPS + 1)]
    assert all(a.elapsed_ms <= b.elapsed_ms for a, b in itertools.pairwise(steps))
    previews = [event.preview for event in events if event.HasField("preview")]
    assert [p.step for p in previews] == [2, 4]
    # Small and cheap: latent resolution (64 px / 8), PNG.
    assert all((i.width, i.height, i.mime_type, i.seed) == (8, 8, "image/png", 3) for p in previews for i in p.images)
    assert not np.array_equal(pixels(previews[0].images[0]), pixels(previews[1].images[0]))
    result = events[-1].result
    unary = streaming.stub.Generate(request(3, style_a), timeout=120)
    assert result.images[0].data == unary.images[0].data
    assert list(result.adapters) == list(unary.adapters) and result.num_inference_steps == STEPS


def test_without_previews_there_are_none(streaming: InProcessServer) -> None:
    assert "preview" not in kinds(stream(streaming, request(1), every=0))


def test_each_stream_of_a_mixed_batch_sees_its_own_samples(streaming: InProcessServer, style_a: Path) -> None:
    """A long request holds the model; two streams queue behind it (positions 0 and 1), share one batch, and
    each one's previews are those it gets alone."""
    alone_a, alone_b = stream(streaming, request(5, style_a)), stream(streaming, request(6))
    blocker = streaming.stub.GenerateStream(pb.GenerateStreamRequest(request=request(9, steps=STEPS)), timeout=120)
    blocker_events = iter(blocker)
    assert [next(blocker_events).WhichOneof("event") for _ in range(2)] == ["queued", "started"]
    got: dict[str, queue.Queue[pb.GenerateEvent | None]] = {"a": queue.Queue(), "b": queue.Queue()}

    def consume(name: str, req: pb.GenerateRequest) -> None:
        for event in stream_iter(streaming, req):
            got[name].put(event)
        got[name].put(None)

    first = threading.Thread(target=consume, args=("a", request(5, style_a)))
    first.start()
    assert got["a"].get(timeout=60).queued.position == 0  # queued behind the running blocker
    second = threading.Thread(target=consume, args=("b", request(6)))
    second.start()
    list(blocker_events)
    first.join(120)
    second.join(120)
    together = {name: drain(events) for name, events in got.items()}
    assert together["b"][0].queued.position == 1
    for name, alone in (("a", alone_a), ("b", alone_b)):
        events = together[name]
        assert next(e.started.batch_size for e in events if e.HasField("started")) == 2
        # Batched equals solo to float rounding (over 6 steps: a few 8-bit levels at most), not to the byte.
        diff = np.abs(pixels(events[-1].result.images[0]) - pixels(alone[-1].result.images[0]))
        assert diff.max() <= 3 and diff.mean() < 0.1
        mine = [pixels(e.preview.images[0]) for e in events if e.HasField("preview")]
        solo = [pixels(e.preview.images[0]) for e in alone if e.HasField("preview")]
        assert len(mine) == len(solo) == 2
        assert all(np.abs(m - s).max() <= 3 for m, s in zip(mine, solo, strict=True))
    a_preview = next(pixels(e.preview.images[0]) for e in together["a"] if e.HasField("preview"))
    b_preview = next(pixels(e.preview.images[0]) for e in together["b"] if e.HasField("preview"))
    assert np.abs(a_preview - b_preview).max() > 8


def stream_iter(server: InProcessServer, req: pb.GenerateRequest) -> Iterator[pb.GenerateEvent]:
    return iter(server.stub.GenerateStream(pb.GenerateStreamRequest(request=req, preview_every_steps=2), timeout=120))


def drain(events: queue.Queue[pb.GenerateEvent | None]) -> list[pb.GenerateEvent]:
    out = []
    while (event := events.get(timeout=60)) is not None:
        out.append(event)
    return out


def test_closing_the_stream_stops_the_work(streaming: InProcessServer) -> None:
    call = streaming.stub.GenerateStream(pb.GenerateStreamRequest(request=request(2, steps=500)), timeout=120)
    for event in call:
        if event.HasField("step") and event.step.step == 2:
            break
    call.cancel()
    # The server stops at the next step and says so in its request line; then it serves the next one.
    end_line = wait_for_line(streaming, "outcome=CANCELLED", "steps=500 ")
    assert "steps_done=500" not in end_line
    assert kinds(stream(streaming, request(1), every=0))[-1] == "result"


def wait_for_line(server: InProcessServer, *words: str) -> str:
    """The last log line holding all these words, once one is written."""
    import time

    end = time.monotonic() + 60
    while time.monotonic() < end:
        lines = [line for line in server.log().splitlines() if all(word in line for word in words)]
        if lines:
            return lines[-1]
        time.sleep(0.05)
    raise AssertionError(f"no log line with {words!r}")


def test_a_bad_request_ends_the_stream_with_its_status(streaming: InProcessServer) -> None:
    bad = pb.GenerateRequest(prompt="x", sampling_params=pb.SamplingParams(num_inference_steps=100_000))
    with pytest.raises(grpc.RpcError) as refused:
        stream(streaming, bad)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "num_inference_steps" in refused.value.details()


def test_a_queued_stream_is_told_each_time_it_moves(streaming: InProcessServer) -> None:
    """Three shapes that cannot batch together, one batch at a time: the last is told place 1, then place 0."""
    blocker = iter(
        streaming.stub.GenerateStream(pb.GenerateStreamRequest(request=request(1, steps=STEPS)), timeout=120)
    )
    assert [next(blocker).WhichOneof("event") for _ in range(2)] == ["queued", "started"]
    got: dict[str, queue.Queue[pb.GenerateEvent | None]] = {"x": queue.Queue(), "y": queue.Queue()}

    def consume(name: str, side: int) -> None:
        sampling = pb.SamplingParams(height=side, width=side, num_inference_steps=STEPS, seed=2)
        for event in stream_iter(streaming, pb.GenerateRequest(prompt="moving", sampling_params=sampling)):
            got[name].put(event)
        got[name].put(None)

    first = threading.Thread(target=consume, args=("x", 32))
    first.start()
    assert got["x"].get(timeout=60).queued.position == 0
    second = threading.Thread(target=consume, args=("y", 48))
    second.start()
    list(blocker)
    first.join(120)
    second.join(120)
    places = [e.queued.position for e in drain(got["y"]) if e.HasField("queued")]
    assert places == [1, 0]


# ---- the gateway: server-sent events, consumed by the official openai client ------------------------------


@pytest.fixture(scope="module")
def openai_client(gateway: InProcessGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)


EXTRA = {"size": "64x64", "num_inference_steps": 4, "seed": 7}


def test_chat_streams_progress_chunks_then_the_images(openai_client: openai.OpenAI, style_a: Path) -> None:
    extra = {**EXTRA, "lora": {"local_path": str(style_a)}, "partial_images": 1}
    messages: list[Any] = [{"role": "user", "content": "a red chair"}]
    chunks = list(openai_client.chat.completions.create(model="m", messages=messages, stream=True, extra_body=extra))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    progress = [(chunk.model_extra or {})["omni"] for chunk in chunks[:-1]]
    assert [p["event"] for p in progress] == ["queued", "started", "step", "step", "preview", "step", "step"]
    assert progress[1]["adapters"] == ["style_a"] and progress[-1]["total_steps"] == 4
    assert progress[4]["images"][0].startswith("data:image/png;base64,")
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop" and (last.model_extra or {})["omni"]["seeds"] == [7]
    content: Any = last.choices[0].delta.content
    streamed = content[0]["image_url"]["url"]
    whole = openai_client.chat.completions.create(
        model="m", messages=messages, extra_body={**extra, "partial_images": None}
    )
    whole_content: Any = whole.choices[0].message.content
    assert streamed == whole_content[0]["image_url"]["url"]


def test_images_stream_partial_images_then_completed(openai_client: openai.OpenAI) -> None:
    events = list(
        openai_client.images.generate(model="m", prompt="a red chair", stream=True, partial_images=2, extra_body=EXTRA)
    )
    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [getattr(event, "partial_image_index", None) for event in events[:2]] == [0, 1]
    assert events[0].size == "8x8" and events[-1].size == "64x64"
    whole = openai_client.images.generate(model="m", prompt="a red chair", extra_body=EXTRA)
    assert whole.data is not None and events[-1].b64_json == whole.data[0].b64_json


def test_stream_errors_are_the_usual_errors(openai_client: openai.OpenAI, gateway: InProcessGateway) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        list(
            openai_client.images.generate(
                model="m", prompt="x", stream=True, extra_body={**EXTRA, "num_inference_steps": 100_000}
            )
        )
    assert "num_inference_steps" in str(refused.value)
    reply = gateway.post("/v1/images/generations", {"prompt": "x", "partial_images": 2})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "partial_images"
    reply = gateway.post("/v1/images/generations", {"prompt": "x", "stream": True, "partial_images": 4})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "partial_images"


def test_a_client_leaving_the_event_stream_stops_the_work(gateway: InProcessGateway, server: InProcessServer) -> None:
    body = {"messages": [{"role": "user", "content": "leaving"}], "stream": True, "num_inference_steps": 400}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if '"event": "step"' in line:
                break
    line = wait_for_line(server, "outcome=CANCELLED", "steps=400 ")
    assert "steps_done=400" not in line
