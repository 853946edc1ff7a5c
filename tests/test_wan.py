"""Wan 2.1 / 2.2 text-to-video on tiny models built from code: MP4 and PNG frames over gRPC, LoRA against
diffusers + peft, per-sample guidance and adapters in one batch (both Wan 2.2 experts guided), bit-identical
base output, and the frame rules."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from omni_grpc.engine.engine import Engine
from omni_grpc.engine.types import GenerateRequest, GuidanceKind, LoraRequest, OutputKind, SamplingParams
from omni_grpc.errors import InvalidArgument
from omni_grpc.tiny_models.wan import build_tiny_wan
from omni_grpc.v1 import omni_pb2 as pb
from tests.helpers import (
    InProcessGateway,
    InProcessServer,
    base_unchanged_by_adapters,
    start_gateway,
    start_server,
    started_engine,
)
from tests.lora_factory import make_peft_adapter, reference_pipeline_with

PROMPT = "a photo of a cat sitting on a red chair"
FRAMES = 5


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_wan(tmp_path_factory.mktemp("wan"))


@pytest.fixture(scope="module")
def wan(wan_dir: Path) -> Iterator[Engine]:
    with started_engine(model=str(wan_dir), allow_any_lora_path=True, dtype="float32") as engine:
        yield engine


@pytest.fixture(scope="module")
def adapter(wan_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wan-loras")
    return make_peft_adapter(wan_dir, root / "a", rank=4, alpha=8, seed=1, magnitude=0.5)


def request(lora: LoraRequest | None = None, *, seed: int = 0, guidance: float = 5.0, **extra: Any) -> GenerateRequest:
    sampling = SamplingParams(
        height=64, width=64, num_inference_steps=2, seed=seed, guidance_scale=guidance, num_frames=FRAMES
    )
    return GenerateRequest(prompt=PROMPT, sampling=sampling, lora=lora, **extra)


def run(engine: Engine, req: GenerateRequest) -> np.ndarray:
    return np.asarray(engine.generate(req).videos[0].array)


def reference(
    model_dir: Path, *, seed: int, adapter: Path | None = None, scale: float = 1.0, guidance: float = 5.0
) -> np.ndarray:
    pipe = reference_pipeline_with(model_dir, adapter, scale)
    out = pipe(
        prompt=PROMPT,
        height=64,
        width=64,
        num_frames=FRAMES,
        num_inference_steps=2,
        guidance_scale=guidance,
        generator=[torch.Generator("cpu").manual_seed(seed)],
        output_type="np",
    )
    return np.asarray(out.frames[0])


def test_family_and_capabilities(wan: Engine) -> None:
    pipeline = wan.pipeline
    assert pipeline.family.name == "wan" and pipeline.spatial_multiple == 16
    assert (pipeline.default_height, pipeline.default_width, pipeline.default_steps) == (480, 832, 50)
    caps = pipeline.capabilities
    assert (caps.output, caps.negative_prompt, caps.guidance) == (OutputKind.VIDEO, True, GuidanceKind.CFG)
    assert caps.frames is not None and (caps.frames.default_frames, caps.frames.step) == (81, 4)


@pytest.fixture(scope="module")
def wan_server(wan_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    srv = start_server(["--model", str(wan_dir)], log_path=tmp_path_factory.mktemp("logs") / "wan.log")
    yield srv
    srv.stop()


def test_grpc_returns_an_h264_mp4_and_png_frames(wan_server: InProcessServer, wan: Engine) -> None:
    info = wan_server.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    caps = info.capabilities
    assert info.family == "wan" and caps.output == pb.OUTPUT_KIND_VIDEO
    assert (caps.min_frames, caps.frame_step, caps.max_frames, caps.default_frames, caps.default_fps) == (
        1,
        4,
        257,
        81,
        16,
    )
    sampling = pb.SamplingParams(height=64, width=48, num_inference_steps=2, seed=3, num_frames=FRAMES, fps=8)
    reply = wan_server.stub.Generate(
        pb.GenerateRequest(prompt=PROMPT, sampling_params=sampling, return_frames=True), timeout=120
    )
    assert not reply.images and len(reply.videos) == 1
    video = reply.videos[0]
    assert (video.mime_type, video.width, video.height, video.num_frames, video.fps, video.seed) == (
        "video/mp4",
        48,
        64,
        FRAMES,
        8,
        3,
    )
    with av.open(io.BytesIO(video.data)) as container:
        stream = container.streams.video[0]
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        assert (stream.codec_context.name, stream.average_rate, len(decoded)) == ("h264", 8, FRAMES)
    # The PNG frames are the exact 8-bit frames; the MP4 is their lossy (CRF 18) encoding.
    pngs = [np.asarray(Image.open(io.BytesIO(frame.data))) for frame in video.frames]
    assert len(pngs) == FRAMES and all(p.shape == (64, 48, 3) for p in pngs)
    alone = wan.generate(
        GenerateRequest(
            prompt=PROMPT,
            sampling=SamplingParams(height=64, width=48, num_inference_steps=2, seed=3, num_frames=FRAMES),
        )
    ).videos[0]
    assert all(np.array_equal(p, np.asarray(f)) for p, f in zip(pngs, alone.frames, strict=True))
    assert max(np.abs(d.astype(int) - p.astype(int)).mean() for d, p in zip(decoded, pngs, strict=True)) < 20


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_lora_equals_diffusers_and_peft(wan: Engine, wan_dir: Path, adapter: Path, scale: float) -> None:
    got = run(wan, request(LoraRequest(path=str(adapter), scale=scale), seed=3))
    assert got.shape == (FRAMES, 64, 64, 3)
    np.testing.assert_allclose(got, reference(wan_dir, seed=3, adapter=adapter, scale=scale), atol=1e-4, rtol=0)
    assert np.abs(got - reference(wan_dir, seed=3)).max() > 1e-3


def test_base_output_is_bit_identical_with_adapters_loaded(wan_dir: Path, adapter: Path) -> None:
    before = base_unchanged_by_adapters(wan_dir, adapter, lambda engine, lora: run(engine, request(lora, seed=4)))
    np.testing.assert_allclose(before, reference(wan_dir, seed=4), atol=1e-5, rtol=0)


def test_per_sample_guidance_and_adapters_in_one_batch(wan: Engine, adapter: Path) -> None:
    asked = [
        request(LoraRequest(path=str(adapter)), seed=5, guidance=5.0),
        request(seed=6, guidance=2.0, negative_prompt="blurry"),
        request(LoraRequest(path=str(adapter), scale=0.5), seed=7, guidance=8.0),
    ]
    solo = [run(wan, r) for r in asked]
    together = wan.generate_many(asked)
    assert [r.batch_size for r in together] == [3, 3, 3]
    for alone, batched in zip(solo, together, strict=True):
        np.testing.assert_allclose(np.asarray(batched.videos[0].array), alone, atol=1e-4, rtol=0)


def test_wan22_guides_both_experts_per_sample(tmp_path: Path) -> None:
    model = build_tiny_wan(tmp_path / "wan22", version="2.2")
    with started_engine(model=str(model), dtype="float32") as engine:
        asked = [request(seed=1, guidance=5.0), request(seed=2, guidance=2.0), request(seed=3, guidance=9.0)]
        solo = [run(engine, r) for r in asked]
        together = engine.generate_many(asked)
        assert [r.batch_size for r in together] == [3, 3, 3]
        for alone, batched in zip(solo, together, strict=True):
            np.testing.assert_allclose(np.asarray(batched.videos[0].array), alone, atol=1e-4, rtol=0)
        np.testing.assert_allclose(solo[1], reference(model, seed=2, guidance=2.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("frames", "fps"), [(6, None), (0, None), (261, None), (5, 0), (5, 121)])
def test_frame_rules(wan: Engine, frames: int, fps: int | None) -> None:
    sampling = SamplingParams(height=64, width=64, num_inference_steps=2, num_frames=frames, fps=fps)
    with pytest.raises(InvalidArgument) as refused:
        wan.generate(GenerateRequest(prompt=PROMPT, sampling=sampling))
    field = "sampling_params.fps" if fps is not None else "sampling_params.num_frames"
    assert refused.value.field == field
    if fps is None:
        assert "must be 1 + 4k frames, at most 257, for this model (wan)" in str(refused.value)


def test_an_image_model_refuses_frames(server: InProcessServer) -> None:
    for sampling, extra, field in (
        (pb.SamplingParams(num_frames=5), {}, "sampling_params.num_frames"),
        (pb.SamplingParams(fps=8), {}, "sampling_params.fps"),
        (pb.SamplingParams(), {"return_frames": True}, "return_frames"),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            server.stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling_params=sampling, **extra), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"{field}: this model (sd3) makes images, not videos" in refused.value.details()


def test_the_gateway_serves_videos_and_refuses_the_wrong_route(
    wan_server: InProcessServer, gateway: InProcessGateway, tmp_path: Path
) -> None:
    wan_gateway = start_gateway(wan_server.target, [], log_path=tmp_path / "gateway.log")
    try:
        flat = {"prompt": PROMPT, "width": 64, "height": 64, "num_frames": FRAMES, "fps": 8, "num_inference_steps": 2}
        nested = {
            "prompt": PROMPT,
            "sampling_params": {"width": 64, "height": 64, "num_frames": FRAMES, "num_inference_steps": 2, "seed": 1},
        }
        for body in (flat, nested):
            reply = wan_gateway.post("/v1/videos", body)
            assert reply.status_code == 200, reply.text
            with av.open(io.BytesIO(base64.b64decode(reply.json()["data"][0]["b64_json"]))) as container:
                assert len(list(container.decode(container.streams.video[0]))) == FRAMES
        refused = wan_gateway.post("/v1/videos", {**flat, "num_frames": 6})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "num_frames"
        wrong = wan_gateway.post("/v1/images/generations", {"prompt": PROMPT})
        assert wrong.status_code == 400 and "this model (wan) makes videos: POST /v1/videos" in wrong.text
    finally:
        wan_gateway.stop()
    # And the reverse, on the image model: the video route, and frames on an image route.
    wrong = gateway.post("/v1/videos", {"prompt": PROMPT})
    assert wrong.status_code == 400 and "this model (sd3) makes images" in wrong.text
    frames = gateway.post("/v1/images/generations", {"prompt": PROMPT, "num_frames": 5})
    assert frames.status_code == 400 and frames.json()["error"]["param"] == "num_frames"
