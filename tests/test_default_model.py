"""Tests for the embedded tiny default models and their code-generated tokenizer."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)
from transformers import CLIPTokenizer

from omni_grpc.tiny_models import sd3
from omni_grpc.tiny_models.clip_tokenizer import write_clip_tokenizer
from omni_grpc.tiny_models.default import DEFAULT_MODEL_TAG, default_model_dir
from omni_grpc.tiny_models.sd3 import SMALL_SD3, TinySD3Spec, build_tiny_sd3
from tests.lora_factory import reference_image
from tests.tiny_sd15 import build_tiny_sd15

PROMPT = "a photo of a cat sitting on a red chair"


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _generate(pipe: DiffusionPipeline, seed: int) -> np.ndarray:
    # No height/width: the pipeline defaults must already give 64x64.
    out = pipe(
        PROMPT,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    )
    return out.images


# Module-scoped: each build is ~0.5 s; sharing keeps the file well under the time budget.
@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd15(tmp_path_factory.mktemp("sd15"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    out = tmp_path_factory.mktemp("tok")
    write_clip_tokenizer(out)
    return CLIPTokenizer.from_pretrained(out, local_files_only=True)


def test_tokenizer_files_are_reproducible(tmp_path: Path) -> None:
    write_clip_tokenizer(tmp_path / "a")
    write_clip_tokenizer(tmp_path / "b")
    files = _tree_bytes(tmp_path / "a")
    assert set(files) >= {"vocab.json", "merges.txt", "tokenizer_config.json"}
    assert files == _tree_bytes(tmp_path / "b")
    assert files["merges.txt"].startswith(b"#version: 0.2\n")


def test_tokenizer_layout(tokenizer: CLIPTokenizer) -> None:
    vocab = tokenizer.get_vocab()
    n = len(vocab)
    # CLIP layout: 256 byte chars, their </w> variants, merges, then the two specials.
    assert vocab["<|startoftext|>"] == n - 2
    assert vocab["<|endoftext|>"] == n - 1
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert n > 512 + 200  # a few hundred learned merges
    assert tokenizer.model_max_length == 77
    # Merges actually apply: common prompt words are single tokens.
    assert tokenizer.tokenize("a photo of the") == [
        "a</w>",
        "photo</w>",
        "of</w>",
        "the</w>",
    ]


def test_tokenizer_unicode_prompt(tokenizer: CLIPTokenizer) -> None:
    prompt = "Ünïcödé 日本語 🐱‍👤 émoji Ωmega naïve 𝔘"
    ids = tokenizer(prompt).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert ids[0] == bos and ids[-1] == eos
    # Byte-level base alphabet: nothing maps to the unknown token (== eos for CLIP).
    assert eos not in ids[1:-1]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == unicodedata.normalize("NFC", prompt).lower()


def test_tokenizer_truncates_long_prompt(tokenizer: CLIPTokenizer) -> None:
    prompt = " ".join(f"word{i}" for i in range(200))
    assert len(tokenizer(prompt).input_ids) > 77
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


def test_sd3_build_is_byte_reproducible(sd3_dir: Path, tmp_path: Path) -> None:
    again = _tree_bytes(build_tiny_sd3(tmp_path / "again"))
    files = _tree_bytes(sd3_dir)
    assert "transformer/diffusion_pytorch_model.safetensors" in files
    assert "tokenizer_2/vocab.json" in files
    assert files == again


def test_sd3_seed_changes_weights(sd3_dir: Path, tmp_path: Path) -> None:
    other = _tree_bytes(build_tiny_sd3(tmp_path / "seed1", seed=1))
    files = _tree_bytes(sd3_dir)
    key = "transformer/diffusion_pytorch_model.safetensors"
    assert other[key] != files[key]
    assert other["model_index.json"] == files["model_index.json"]


def _assert_deterministic_64px(pipe: DiffusionPipeline) -> None:
    pipe.set_progress_bar_config(disable=True)
    first = _generate(pipe, seed=0)
    assert first.shape == (1, 64, 64, 3)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, _generate(pipe, seed=0))
    assert not np.array_equal(first, _generate(pipe, seed=1))


def test_sd3_generates_deterministic_64px(sd3_dir: Path) -> None:
    _assert_deterministic_64px(
        StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    )


def test_sd3_loads_via_diffusion_pipeline(sd3_dir: Path) -> None:
    pipe = DiffusionPipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert pipe.vae_scale_factor == 8  # as in real SD3
    assert pipe.default_sample_size * pipe.vae_scale_factor == 64


def test_sd15_build_is_byte_reproducible(sd15_dir: Path, tmp_path: Path) -> None:
    files = _tree_bytes(sd15_dir)
    assert "unet/diffusion_pytorch_model.safetensors" in files
    assert files == _tree_bytes(build_tiny_sd15(tmp_path / "again"))


def test_sd15_generates_deterministic_64px(sd15_dir: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(sd15_dir, local_files_only=True)
    assert pipe.safety_checker is None
    _assert_deterministic_64px(pipe)


def test_specs() -> None:
    assert TinySD3Spec().image_size == 64
    assert SMALL_SD3.image_size == 512
    assert SMALL_SD3.vae_scale_factor == 8
    with pytest.raises(ValueError, match="norm_num_groups"):
        TinySD3Spec(vae_block_out_channels=(8, 12))


def test_default_model_dir_builds_once(sd3_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = default_model_dir(tmp_path)
    assert folder == tmp_path / DEFAULT_MODEL_TAG
    assert _tree_bytes(folder) == _tree_bytes(sd3_dir)
    # No temp dirs left behind next to it.
    assert [p.name for p in tmp_path.iterdir()] == [DEFAULT_MODEL_TAG]

    def no_rebuild(*args: object, **kwargs: object) -> Path:
        raise AssertionError("must reuse the cached build")

    monkeypatch.setattr(sd3, "build_tiny_sd3", no_rebuild)
    assert default_model_dir(tmp_path) == folder
    # The env var is the fallback root when no argument is given.
    monkeypatch.setenv("OMNI_GRPC_CACHE", str(tmp_path))
    assert default_model_dir() == folder


def test_default_model_dir_concurrent_builder_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / DEFAULT_MODEL_TAG

    def racing_build(out_dir: Path, *args: object, **kwargs: object) -> Path:
        # Our (fake) build completes, but another process publishes first.
        (out_dir / "model_index.json").write_text("ours")
        final.mkdir()
        (final / "model_index.json").write_text("theirs")
        return out_dir

    monkeypatch.setattr(sd3, "build_tiny_sd3", racing_build)
    assert default_model_dir(tmp_path) == final
    assert (final / "model_index.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == [DEFAULT_MODEL_TAG]


def test_example_adapter_is_reproducible_never_overwrites_and_fits_the_default_model(
    model_dir: Path, cache_root: Path, tmp_path: Path
) -> None:
    from omni_grpc.tiny_models.example_adapter import write_example_adapter

    first, second = tmp_path / "a" / "lora_adapter", tmp_path / "b" / "lora_adapter"
    assert write_example_adapter(first, cache_root) and write_example_adapter(second, cache_root)
    assert _tree_bytes(first) == _tree_bytes(second) and set(_tree_bytes(first)) == {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    (second / "adapter_config.json").write_text("mine")
    assert not write_example_adapter(second, cache_root)
    assert (second / "adapter_config.json").read_text() == "mine"  # left alone
    # peft loads it into the embedded model (every module it names exists), and it shows in the image.
    base = reference_image(model_dir, prompt=PROMPT, seed=3, steps=2)
    assert not np.array_equal(reference_image(model_dir, prompt=PROMPT, seed=3, steps=2, adapter=first), base)
