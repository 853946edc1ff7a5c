"""Wan 2.1 / 2.2 text-to-video on tiny models built from code: MP4 and PNG frames over gRPC, LoRA against
diffusers + peft, per-sample guidance and adapters in one batch (both Wan 2.2 experts guided), bit-identical
base output, and the frame rules."""

from __future__ import annotations

import base64
import dataclasses
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import av
import grpc
import httpx
import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors.torch import load_file, save_file

from omni_grpc.engine.engine import Engine
from omni_grpc.engine.progress import Preview, Progress, ProgressEvent, Step
from omni_grpc.engine.types import GenerateRequest, GuidanceKind, LoraRequest, OutputKind, SamplingParams
from omni_grpc.errors import InvalidArgument
from omni_grpc.tiny_models.wan import build_tiny_wan
from omni_grpc.v1 import omni_pb2 as pb
from tests.helpers import (
    InProcessGateway,
    InProcessServer,
    base_unchanged_by_adapters,
    field_violation,
    rpc_error,
    start_gateway,
    start_server,
    started_engine,
)
from tests.lora_factory import load_reference_pipeline, make_peft_adapter, reference_pipeline_with, to_diffusers_file

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
    return frames_of(reference_pipeline_with(model_dir, adapter, scale), seed=seed, guidance=guidance)


def frames_of(pipe: Any, *, seed: int, guidance: float = 5.0) -> np.ndarray:
    """What a plain diffusers Wan pipeline makes of the test's request, as floats."""
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
    assert info.family == "wan" and caps.output == pb.OUTPUT_KIND_VIDEO and list(caps.experts) == ["transformer"]
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


def test_grpc_expert_errors_on_a_one_denoiser_model(wan_server: InProcessServer, adapter: Path) -> None:
    lora = pb.LoraRequest(path=str(adapter), expert="transformer_2")
    error = rpc_error(wan_server.stub.Generate, pb.GenerateRequest(prompt=PROMPT, loras=[lora]), timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violation(error) == "loras[0].expert"
    assert "'transformer_2': this model has one denoiser (transformer)" in error.details()
    error = rpc_error(wan_server.stub.UnloadAdapter, pb.UnloadAdapterRequest(id=7, expert="transformer"), timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violation(error) == "expert"
    assert "expert goes with a path" in error.details()


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


@pytest.fixture(scope="module")
def wan22_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_wan(tmp_path_factory.mktemp("wan22"), version="2.2")


@pytest.fixture(scope="module")
def wan22(wan22_dir: Path) -> Iterator[Engine]:
    with started_engine(model=str(wan22_dir), allow_any_lora_path=True, dtype="float32") as engine:
        yield engine


@pytest.fixture(scope="module")
def expert_pair(wan22_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A Wan 2.2 LoRA as they are published: a high-noise and a low-noise file, each in diffusers' layout and
    each naming `transformer.` (the file does not say which expert it is for)."""
    root = tmp_path_factory.mktemp("wan22-loras")
    high = make_peft_adapter(wan22_dir, root / "high-peft", seed=11, magnitude=0.5)
    low = make_peft_adapter(wan22_dir, root / "low-peft", seed=12, magnitude=0.5, component="transformer_2")
    return (
        to_diffusers_file(high, root / "high", pipeline=WanPipeline),
        to_diffusers_file(low, root / "low", pipeline=WanPipeline),
    )


def expert_reference(model_dir: Path, *, seed: int, loras: Sequence[tuple[Path, bool, float]]) -> np.ndarray:
    """diffusers' own Wan loader: each file into transformer, or transformer_2 (`load_into_transformer_2`), at its
    scale (peft's set_scale)."""
    pipe = load_reference_pipeline(model_dir)
    for index, (file, into_second, scale) in enumerate(loras):
        name = f"lora{index}"
        pipe.load_lora_weights(str(file), adapter_name=name, load_into_transformer_2=into_second)
        for module in (pipe.transformer_2 if into_second else pipe.transformer).modules():
            if isinstance(module, LoraLayer) and name in module.scaling:
                module.set_scale(name, scale)
    return frames_of(pipe, seed=seed)


def loras_request(*loras: LoraRequest, seed: int) -> GenerateRequest:
    return dataclasses.replace(request(seed=seed), loras=list(loras))


def test_wan22_guides_both_experts_per_sample(wan22: Engine, wan22_dir: Path) -> None:
    asked = [request(seed=1, guidance=5.0), request(seed=2, guidance=2.0), request(seed=3, guidance=9.0)]
    solo = [run(wan22, r) for r in asked]
    together = wan22.generate_many(asked)
    assert [r.batch_size for r in together] == [3, 3, 3]
    for alone, batched in zip(solo, together, strict=True):
        np.testing.assert_allclose(np.asarray(batched.videos[0].array), alone, atol=1e-4, rtol=0)
    np.testing.assert_allclose(solo[1], reference(wan22_dir, seed=2, guidance=2.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_wan22_lora_into_the_low_noise_expert_equals_diffusers(
    wan22: Engine, wan22_dir: Path, expert_pair: tuple[Path, Path], scale: float
) -> None:
    _, low = expert_pair
    result = wan22.generate(loras_request(LoraRequest(path=str(low), scale=scale, expert="transformer_2"), seed=3))
    got = np.asarray(result.videos[0].array)
    np.testing.assert_allclose(got, expert_reference(wan22_dir, seed=3, loras=[(low, True, scale)]), atol=1e-4, rtol=0)
    assert result.adapters[0].expert == "transformer_2"
    # Not the base model's output, nor the same file in the high-noise expert.
    assert np.abs(got - run(wan22, request(seed=3))).max() > 1e-3
    into_high = wan22.generate(loras_request(LoraRequest(path=str(low), scale=scale), seed=3))
    assert into_high.adapters[0].expert == "" and into_high.adapters[0].id != result.adapters[0].id
    assert np.abs(got - np.asarray(into_high.videos[0].array)).max() > 1e-3


def test_wan22_high_and_low_pair_in_one_request_equals_diffusers(
    wan22: Engine, wan22_dir: Path, expert_pair: tuple[Path, Path]
) -> None:
    high, low = expert_pair
    pair = (LoraRequest(path=str(high), scale=0.8), LoraRequest(path=str(low), scale=1.2, expert="transformer_2"))
    got = run(wan22, loras_request(*pair, seed=4))
    want = expert_reference(wan22_dir, seed=4, loras=[(high, False, 0.8), (low, True, 1.2)])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_wan22_mixed_experts_in_one_batch_equal_solo_runs(wan22: Engine, expert_pair: tuple[Path, Path]) -> None:
    high, low = expert_pair
    asked = [
        loras_request(LoraRequest(path=str(high)), seed=5),
        loras_request(LoraRequest(path=str(low), expert="transformer_2", scale=0.7), seed=6),
        loras_request(LoraRequest(path=str(high)), LoraRequest(path=str(low), expert="transformer_2"), seed=7),
        request(seed=8),
        loras_request(LoraRequest(path=str(low)), seed=9),
    ]
    solo = [run(wan22, r) for r in asked]
    together = wan22.generate_many(asked)
    assert [r.batch_size for r in together] == [5] * 5
    for alone, batched in zip(solo, together, strict=True):
        np.testing.assert_allclose(np.asarray(batched.videos[0].array), alone, atol=1e-4, rtol=0)
    # One file in two experts is two adapters; the ListAdapters entries say which expert each goes into.
    from_low = {info.expert: info for info in wan22.list_adapters() if info.path == str(low.resolve())}
    assert sorted(from_low) == ["", "transformer_2"] and from_low[""].id != from_low["transformer_2"].id
    assert (from_low[""].components, from_low["transformer_2"].components) == (["denoiser"], ["transformer_2"])


def test_wan22_expert_errors(wan22: Engine, expert_pair: tuple[Path, Path], tmp_path: Path) -> None:
    high, low = expert_pair
    with pytest.raises(InvalidArgument) as refused:
        wan22.generate(loras_request(LoraRequest(path=str(low), expert="transformer_3"), seed=1))
    assert refused.value.field == "loras[0].expert"
    assert "'transformer_3' is not a denoiser of this model; it has transformer (the default), transformer_2" in str(
        refused.value
    )
    # By name, the expert must be the adapter's own.
    wan22.load_adapter(str(low), name="low-noise", expert="transformer_2")
    served = wan22.generate(request(LoraRequest(name="low-noise"), seed=1))
    assert served.adapters[0].expert == "transformer_2"
    with pytest.raises(InvalidArgument) as refused:
        wan22.generate(request(LoraRequest(name="low-noise", expert="transformer"), seed=1))
    assert refused.value.field == "lora_request.expert"
    assert "adapter 'low-noise' goes into transformer_2, not the first expert" in str(refused.value)
    # A file that names its experts itself loads without one, and is refused with one.
    both = tmp_path / "both.safetensors"
    second = {key.replace("transformer.", "transformer_2.", 1): value for key, value in load_file(low).items()}
    save_file({**load_file(high), **second}, both)
    info, _ = wan22.load_adapter(str(both))
    assert info.components == ["denoiser", "transformer_2"]
    with pytest.raises(InvalidArgument) as refused:
        wan22.load_adapter(str(both), expert="transformer_2")
    assert "already names transformer_2; a file that names its experts itself loads without an expert" in str(
        refused.value
    )
    # Unloading by path takes the expert: the other expert's adapter from that file stays.
    wan22.load_adapter(str(low))
    removed = wan22.unload_adapter(path=str(low), expert="transformer_2")
    assert removed.name == "low-noise"
    assert [info.expert for info in wan22.list_adapters() if info.path == str(low.resolve())] == [""]


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
        # vLLM-Omni's form fields (curl -F), nested parts as JSON text: the same video as the same JSON body.
        form = {key: str(value) for key, value in flat.items()} | {"seed": "2"}
        as_json = wan_gateway.post("/v1/videos", {**flat, "seed": 2}).json()["data"][0]["b64_json"]
        multipart = httpx.post(f"{wan_gateway.url}/v1/videos", data=form, files={"x": (None, "")}, timeout=300)
        assert multipart.status_code == 400 and multipart.json()["error"]["param"] == "x"  # an unknown field
        multipart = httpx.post(f"{wan_gateway.url}/v1/videos", files={k: (None, v) for k, v in form.items()})
        assert multipart.status_code == 200, multipart.text
        assert multipart.json()["data"][0]["b64_json"] == as_json
        urlencoded = httpx.post(f"{wan_gateway.url}/v1/videos", data=form, timeout=300)
        assert urlencoded.status_code == 200 and urlencoded.json()["data"][0]["b64_json"] == as_json
        for fields, param, words in (
            ({**form, "num_frames": "six"}, "num_frames", "num_frames: Input should be a valid integer"),
            ({**form, "loras": "[{"}, "loras", "loras: a form field holding loras must be JSON text"),
            ({**form, "loras": '[{"path": "/x", "expert": "transformer_2"}]'}, "loras.0.expert", "one denoiser"),
        ):
            refused = httpx.post(f"{wan_gateway.url}/v1/videos", data=fields, timeout=300)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text
            assert words in refused.json()["error"]["message"]
        upload = httpx.post(f"{wan_gateway.url}/v1/videos", data=form, files={"input_reference": ("a.png", b"x")})
        assert upload.status_code == 400 and "input_reference: this route takes no files" in upload.text
        # Other routes still take JSON only.
        image_form = httpx.post(f"{wan_gateway.url}/v1/images/generations", data={"prompt": PROMPT})
        assert image_form.status_code == 415
        refused = wan_gateway.post("/v1/videos", {**flat, "num_frames": 6})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "num_frames"
        expert = wan_gateway.post("/v1/videos", {**flat, "loras": [{"path": "/x", "expert": "transformer_2"}]})
        assert expert.status_code == 400 and expert.json()["error"]["param"] == "loras.0.expert", expert.text
        wrong = wan_gateway.post("/v1/images/generations", {"prompt": PROMPT})
        assert wrong.status_code == 400 and "this model (wan) makes videos: POST /v1/videos" in wrong.text
    finally:
        wan_gateway.stop()
    # And the reverse, on the image model: the video route, and frames on an image route.
    wrong = gateway.post("/v1/videos", {"prompt": PROMPT})
    assert wrong.status_code == 400 and "this model (sd3) makes images" in wrong.text
    frames = gateway.post("/v1/images/generations", {"prompt": PROMPT, "num_frames": 5})
    assert frames.status_code == 400 and frames.json()["error"]["param"] == "num_frames"


def test_progress_of_a_video_previews_its_first_frame(wan: Engine) -> None:
    events: list[ProgressEvent] = []
    streamed = wan.generate(request(seed=3), progress=Progress(events.append, preview_every=1))
    steps = [event.step for event in events if isinstance(event, Step)]
    previews = [event for event in events if isinstance(event, Preview)]
    assert steps == [1, 2] and [p.step for p in previews] == [1] and len(previews[0].images) == 1
    side = 64 // wan.pipeline.pipe.vae_scale_factor_spatial
    assert (previews[0].images[0].width, previews[0].images[0].height) == (side, side)
    np.testing.assert_array_equal(np.asarray(streamed.videos[0].array), run(wan, request(seed=3)))
