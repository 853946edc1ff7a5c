"""Flux.1 on a tiny model built from code: LoRA against diffusers + peft, per-sample distilled guidance and
adapters in one batch, bit-identical base output, and what the family refuses."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from omni_grpc.engine.engine import Engine
from omni_grpc.engine.progress import Preview, Progress, ProgressEvent
from omni_grpc.engine.types import GenerateRequest, GuidanceKind, LoraRequest, OutputKind, SamplingParams
from omni_grpc.errors import InvalidArgument
from omni_grpc.tiny_models.flux import build_tiny_flux
from omni_grpc.v1 import omni_pb2 as pb
from tests.helpers import base_unchanged_by_adapters, start_gateway, start_server, started_engine
from tests.lora_factory import make_peft_adapter, reference_pixels

PROMPT = "a photo of a cat sitting on a red chair"
FLUX_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_out")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def flux(flux_dir: Path) -> Iterator[Engine]:
    with started_engine(model=str(flux_dir), allow_any_lora_path=True, dtype="float32") as engine:
        yield engine


@pytest.fixture(scope="module")
def adapters(flux_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("flux-loras")
    return (
        make_peft_adapter(flux_dir, root / "a", rank=4, alpha=8, targets=FLUX_TARGETS, seed=1, magnitude=0.3),
        make_peft_adapter(flux_dir, root / "b", rank=2, alpha=2, targets=("to_q", "to_v"), seed=2, magnitude=0.3),
    )


def request(*loras: LoraRequest, seed: int = 0, guidance: float | None = 3.5, **extra: Any) -> GenerateRequest:
    sampling = SamplingParams(height=64, width=64, num_inference_steps=2, seed=seed, guidance_scale=guidance)
    if len(loras) == 1:
        return GenerateRequest(prompt=PROMPT, sampling=sampling, lora=loras[0], **extra)
    return GenerateRequest(prompt=PROMPT, sampling=sampling, loras=list(loras), **extra)


def run(engine: Engine, req: GenerateRequest) -> np.ndarray:
    return np.asarray(engine.generate(req).images[0].array)


def reference(flux_dir: Path, *, seed: int, adapter: Path | None = None, scale: float = 1.0) -> np.ndarray:
    return reference_pixels(flux_dir, prompt=PROMPT, seed=seed, adapter=adapter, scale=scale, guidance_scale=3.5)


def test_family_and_capabilities(flux: Engine) -> None:
    pipeline = flux.pipeline
    assert pipeline.family.name == "flux" and pipeline.spatial_multiple == 16
    assert (pipeline.default_height, pipeline.default_steps, pipeline.default_guidance) == (1024, 28, 3.5)
    caps = pipeline.capabilities
    assert (caps.output, caps.negative_prompt, caps.guidance) == (OutputKind.IMAGE, False, GuidanceKind.DISTILLED)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_lora_equals_diffusers_and_peft(
    flux: Engine, flux_dir: Path, adapters: tuple[Path, Path], scale: float
) -> None:
    got = run(flux, request(LoraRequest(path=str(adapters[0]), scale=scale), seed=3))
    expected = reference(flux_dir, seed=3, adapter=adapters[0], scale=scale)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.abs(got - reference(flux_dir, seed=3)).max() > 1e-2  # the adapter shows


def test_base_output_is_bit_identical_with_adapters_loaded(flux_dir: Path, adapters: tuple[Path, Path]) -> None:
    before = base_unchanged_by_adapters(
        flux_dir, adapters[0], lambda engine, lora: run(engine, request(*([lora] if lora else []), seed=4))
    )
    np.testing.assert_allclose(before, reference(flux_dir, seed=4), atol=1e-5, rtol=0)


def test_per_sample_guidance_and_adapters_in_one_batch(flux: Engine, adapters: tuple[Path, Path]) -> None:
    a, b = (str(p) for p in adapters)
    asked = [
        request(LoraRequest(path=a), seed=5, guidance=3.5),
        request(seed=6, guidance=1.5),
        request(LoraRequest(path=a, scale=0.7), LoraRequest(path=b, scale=-0.5), seed=7, guidance=7.0),
        request(LoraRequest(path=b, scale=0.5), seed=8, guidance=None),
    ]
    solo = [run(flux, r) for r in asked]
    together = flux.generate_many(asked)
    assert [r.batch_size for r in together] == [4, 4, 4, 4]  # one denoising batch, every scale in it
    for alone, batched in zip(solo, together, strict=True):
        np.testing.assert_allclose(np.asarray(batched.images[0].array), alone, atol=1e-4, rtol=0)
    # Guidance is applied per sample: the same sample at another scale is another image.
    assert np.abs(solo[1] - run(flux, request(seed=6, guidance=7.0))).max() > 1e-3


def test_a_negative_prompt_and_a_size_off_the_grid_are_refused(flux: Engine) -> None:
    with pytest.raises(InvalidArgument, match=r"negative_prompt: this model \(flux\) does not use a negative prompt"):
        flux.generate(request(negative_prompt="blurry"))
    with pytest.raises(InvalidArgument, match="must be a multiple of 16"):
        flux.generate(GenerateRequest(prompt=PROMPT, sampling=SamplingParams(height=72, width=64)))


def test_schnell_has_no_guidance_input(tmp_path: Path) -> None:
    with started_engine(model=str(build_tiny_flux(tmp_path / "schnell", variant="schnell"))) as engine:
        assert engine.pipeline.capabilities.guidance is GuidanceKind.NONE
        with pytest.raises(InvalidArgument, match="has no guidance input; leave it unset") as refused:
            engine.generate(request(guidance=3.5))
        assert refused.value.field == "sampling_params.guidance_scale"
        assert engine.generate(request(guidance=None)).images


def test_served_over_grpc_and_the_gateway(flux_dir: Path, tmp_path: Path) -> None:
    """GetServerInfo names the family and its capabilities; the image routes serve it; a negative prompt is a
    400 saying why."""
    srv = start_server(["--model", str(flux_dir), "--served-model-name", "tiny-flux"], log_path=tmp_path / "s.log")
    gw = start_gateway(srv.target, [], log_path=tmp_path / "g.log")
    try:
        info = srv.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        assert (info.family, info.spatial_multiple, info.default_height) == ("flux", 16, 1024)
        caps = info.capabilities
        assert (caps.output, caps.negative_prompt, caps.guidance) == (
            pb.OUTPUT_KIND_IMAGE,
            False,
            pb.GUIDANCE_KIND_DISTILLED,
        )
        body = {"prompt": PROMPT, "size": "64x64", "num_inference_steps": 2, "seed": 1}
        reply = gw.post("/v1/images/generations", body)
        assert reply.status_code == 200, reply.text
        refused = gw.post("/v1/images/generations", {**body, "negative_prompt": "blurry"})
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["param"] == "negative_prompt" and "does not use a negative prompt" in error["message"]
    finally:
        gw.stop()
        srv.stop()


def test_progress_previews_unpack_the_packed_latents(flux: Engine) -> None:
    events: list[ProgressEvent] = []
    req = dataclasses.replace(
        request(seed=2), sampling=dataclasses.replace(request(seed=2).sampling, num_inference_steps=3)
    )
    streamed = flux.generate(req, progress=Progress(events.append, preview_every=1))
    previews = [event for event in events if isinstance(event, Preview)]
    side = 64 // flux.pipeline.pipe.vae_scale_factor
    assert [p.step for p in previews] == [1, 2]
    assert all((image.width, image.height) == (side, side) for p in previews for image in p.images)
    assert [type(event).__name__ for event in events[:2]] == ["Queued", "Started"]
    np.testing.assert_array_equal(np.asarray(streamed.images[0].array), run(flux, req))
