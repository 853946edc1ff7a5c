"""The engine in-process: memory after unload, the diffusers LoRA format, the UNet family, offline API."""

from __future__ import annotations

import gc
import json
import re
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from omni_grpc import Omni, OmniDiffusionSamplingParams
from omni_grpc.config import EngineConfig
from omni_grpc.engine.engine import Engine
from omni_grpc.engine.pipeline import load_pipeline
from omni_grpc.engine.types import GenerateRequest, LoraRequest, SamplingParams
from omni_grpc.errors import InvalidArgument, ModelLoadError
from tests.lora_factory import assert_close_image, make_peft_adapter, mean_abs_diff, reference_image, to_diffusers_file
from tests.tiny_sd15 import build_tiny_sd15

PROMPT = "a lighthouse at dusk"


@pytest.fixture(scope="module")
def engine(cache_root: Path) -> Iterator[Engine]:
    eng = Engine(EngineConfig(cache_dir=cache_root, max_loaded_adapters=4, allow_any_lora_path=True)).start()
    yield eng
    eng.close()


def run(engine: Engine, lora: LoraRequest | None = None, seed: int = 9, steps: int = 3) -> np.ndarray:
    request = GenerateRequest(
        prompt=PROMPT, sampling=SamplingParams(height=64, width=64, num_inference_steps=steps, seed=seed), lora=lora
    )
    return np.asarray(engine.generate(request).images[0].image)


def test_unload_frees_the_adapter_tensors(engine: Engine, style_a: Path) -> None:
    assert engine.lora.resident_bytes() == 0
    before = run(engine)
    info, _ = engine.load_adapter(str(style_a))
    expected = sum(t.nbytes for t in load_file(style_a / "adapter_model.safetensors").values())
    assert engine.lora.resident_bytes() == info.size_bytes == expected  # its own bytes, nothing more
    ((slot,),) = (s.values() for s in engine.lora._slots.values())
    tensor = weakref.ref(next(iter(slot.modules.values())).a)
    del slot
    engine.unload_adapter(name=info.name)
    gc.collect()
    assert engine.lora.resident_bytes() == 0 and tensor() is None
    assert np.array_equal(run(engine), before)


def test_diffusers_format_file_and_folder(engine: Engine, style_a: Path, model_dir: Path, tmp_path: Path) -> None:
    file = to_diffusers_file(style_a, tmp_path / "diffusers_style_a")
    expected = reference_image(model_dir, prompt=PROMPT, seed=9, steps=3, adapter=style_a)
    for path in (file, file.parent):
        info, _ = engine.load_adapter(str(path))
        assert info.format.value == "diffusers" and (info.rank, info.alpha) == (4, 8.0)
        assert_close_image(run(engine, LoraRequest(id=info.id)), expected)
        engine.unload_adapter(adapter_id=info.id)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_or_inf_weights_are_refused(engine: Engine, style_a: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    bad = tmp_path / "nan"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((style_a / "adapter_config.json").read_text())
    tensors = {k: v.to(dtype) for k, v in load_file(style_a / "adapter_model.safetensors").items()}
    key = sorted(tensors)[3]
    tensors[key][0, 0] = float("nan") if dtype == torch.float32 else float("inf")
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(InvalidArgument, match=f"tensor '{re.escape(key)}' contains NaN or Inf"):
        engine.load_adapter(str(bad))
    tensors[key][0, 0] = 0.0
    save_file(tensors, bad / "adapter_model.safetensors")
    info, _ = engine.load_adapter(str(bad))  # the same file without the bad value loads
    engine.unload_adapter(adapter_id=info.id)


def test_unreadable_paths_and_bad_patterns_are_invalid_argument(engine: Engine, style_a: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="could not be read"):
        engine.load_adapter("/tmp/" + "x" * 300)  # one name over 255 bytes: ENAMETOOLONG
    bad = tmp_path / "bad_pattern"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((style_a / "adapter_model.safetensors").read_bytes())
    config = json.loads((style_a / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"(": 8}}))
    with pytest.raises(InvalidArgument, match="not a module name"):
        engine.load_adapter(str(bad))


def test_sd15_unet_family(tmp_path: Path) -> None:
    model = build_tiny_sd15(tmp_path / "sd15")
    adapter = make_peft_adapter(model, tmp_path / "unet_lora", rank=4, alpha=2, unet=True, magnitude=0.5)
    eng = Engine(EngineConfig(model=str(model), allow_any_lora_path=True)).start()
    try:
        assert eng.pipeline.family.name == "sd" and eng.pipeline.spatial_multiple == 8
        base = run(eng, steps=2)
        assert_close_image(base, reference_image(model, prompt=PROMPT, seed=9, steps=2))
        for scale in (1.0, 0.5):
            got = run(eng, LoraRequest(path=str(adapter), scale=scale), steps=2)
            expected = reference_image(model, prompt=PROMPT, seed=9, steps=2, adapter=adapter, scale=scale)
            assert_close_image(got, expected)
        assert mean_abs_diff(got, base) > 1
        assert np.array_equal(run(eng, steps=2), base)
    finally:
        eng.close()


def test_hub_id_without_a_hub_says_to_use_a_local_folder() -> None:
    with pytest.raises(ModelLoadError) as info:
        load_pipeline("stabilityai/stable-diffusion-3.5-medium")
    assert "local diffusers folder" in info.value.message and "stabilityai" in info.value.message


def test_model_folder_without_model_index(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model_index\.json"):
        load_pipeline(str(tmp_path))


def test_offline_api_mirrors_the_seed(cache_root: Path, style_a: Path, preloaded: Path) -> None:
    omni = Omni(lora_path=str(preloaded), progress_bar=False, config=None)
    try:
        outputs = omni.generate(
            PROMPT,
            OmniDiffusionSamplingParams(
                num_inference_steps=2, height=64, width=64, seed=4, lora_request={"path": str(style_a), "scale": 1.0}
            ),
        )
        result = outputs[0]
        assert result.adapter is not None and result.adapter.name == "style_a"
        assert result.images[0].image.size == (64, 64) and result.images[0].seed == 4
        names = {a.name: a for a in omni.list_adapters()}
        assert names["pre"].pinned and not names["style_a"].pinned
        base = omni.generate(PROMPT, OmniDiffusionSamplingParams(num_inference_steps=2, height=64, width=64, seed=4))
        assert base[0].adapter is None
        assert mean_abs_diff(np.asarray(base[0].images[0].image), np.asarray(result.images[0].image)) > 1
        with pytest.raises(Exception, match="unknown keys"):
            omni.generate(PROMPT, OmniDiffusionSamplingParams(lora_request={"paht": "x"}))
    finally:
        omni.close()
