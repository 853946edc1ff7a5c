"""Benchmark models (built from code, cached) and random PEFT-format adapters that fit them."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from omni_grpc.tiny_models.default import default_model_dir
from omni_grpc.tiny_models.sd3 import SMALL_SD3, TinySD3Spec, build_tiny_sd3

SD3_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class BenchModel:
    name: str
    path: Path
    # The SD3 geometry its adapters are written for; None: adapters written by peft on its denoiser.
    spec: TinySD3Spec | None
    # Video models: frames per request.
    frames: int | None = None


def cached(folder: Path, build: Callable[[Path], object]) -> Path:
    """`folder`, built once (into a temporary folder renamed into place, so a half-built model is never used)."""
    if not (folder / "model_index.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        build(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def bench_models(cache_root: Path) -> dict[str, BenchModel]:
    """The tiny default model and the small one (512x512, 8 layers, 8 heads x 32), cached."""
    small = cached(cache_root / "small-sd3-v1", lambda out: build_tiny_sd3(out, SMALL_SD3))
    return {
        "tiny": BenchModel("tiny", default_model_dir(cache_root), TinySD3Spec()),
        "small": BenchModel("small", small, SMALL_SD3),
    }


def family_models(cache_root: Path) -> dict[str, BenchModel]:
    """A tiny model of each other family (built from code, cached), for one mixed-workload row each."""
    from omni_grpc.tiny_models.flux import build_tiny_flux
    from omni_grpc.tiny_models.qwen_image import build_tiny_qwen_image
    from omni_grpc.tiny_models.sdxl import build_tiny_sdxl
    from omni_grpc.tiny_models.wan import build_tiny_wan

    builders: dict[str, Callable[[Path], object]] = {
        "sdxl": build_tiny_sdxl,
        "flux": build_tiny_flux,
        "qwen-image": build_tiny_qwen_image,
        "wan": build_tiny_wan,
    }
    frames = {"wan": 5}
    return {
        name: BenchModel(name, cached(cache_root / f"bench-{name}-v1", build), None, frames.get(name))
        for name, build in builders.items()
    }


def write_adapter(
    folder: Path,
    spec: TinySD3Spec,
    *,
    rank: int,
    seed: int,
    magnitude: float = 0.05,
    targets: tuple[str, ...] = SD3_TARGETS,
    alpha: float | None = None,
) -> Path:
    """A PEFT folder (keys and config as peft writes them) adapting `targets` in every block of an SD3
    transformer of `spec`, with random weights; alpha defaults to 2 r."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    dim = spec.inner_dim
    tensors = {}
    for layer in range(spec.num_layers):
        for target in targets:
            key = f"base_model.model.transformer_blocks.{layer}.attn.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, dim, generator=gen) / rank**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(dim, rank, generator=gen) * magnitude
    save_file(tensors, folder / "adapter_model.safetensors")
    lora_alpha = 2 * rank if alpha is None else alpha
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": lora_alpha, "target_modules": list(targets)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def write_peft_adapter(folder: Path, model: Path, *, rank: int, seed: int) -> Path:
    """A PEFT folder written by peft itself on the denoiser of the pipeline at `model` (attention projections),
    with random weights; alpha = 2 r."""
    import diffusers
    from peft import LoraConfig, get_peft_model

    index = json.loads((model / "model_index.json").read_text())
    component = "unet" if "unet" in index else "transformer"
    denoiser = getattr(diffusers, index[component][1]).from_pretrained(str(model / component))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(SD3_TARGETS), init_lora_weights="gaussian")
        peft_model = get_peft_model(denoiser, config)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.05)
    peft_model.save_pretrained(str(folder), save_embedding_layers=False)
    return folder


def adapter_set(root: Path, model: BenchModel, count: int, rank: int = 8) -> list[Path]:
    folders = [root / f"{model.name}-r{rank}-{i:04d}" for i in range(count)]
    if model.spec is None:
        return [write_peft_adapter(folder, model.path, rank=rank, seed=i) for i, folder in enumerate(folders)]
    return [write_adapter(folder, model.spec, rank=rank, seed=i) for i, folder in enumerate(folders)]


def write_lycoris_file(
    file: Path, spec: TinySD3Spec, *, algorithm: str, rank: int, seed: int, targets: tuple[str, ...] = SD3_TARGETS
) -> Path:
    """A LyCORIS file in its `lycoris_<module>` names on the same modules as `write_adapter`: a LoHa
    (two rank-`rank` pairs, Hadamard product) or a LoKr (a full 16x16 `lokr_w1` Kronecker a rank-`rank`
    factorised `lokr_w2`), alpha = rank."""
    gen = torch.Generator().manual_seed(seed)
    dim = spec.inner_dim
    small = 16  # LoKr's factor: dim = 16 x (dim / 16)
    tensors = {}
    for layer in range(spec.num_layers):
        for target in targets:
            key = f"lycoris_transformer_blocks_{layer}_attn_{target.replace('.', '_')}"
            if algorithm == "loha":
                for w in ("w1", "w2"):
                    tensors[f"{key}.hada_{w}_a"] = torch.randn(dim, rank, generator=gen) * 0.1
                    tensors[f"{key}.hada_{w}_b"] = torch.randn(rank, dim, generator=gen) / rank**0.5
            else:
                tensors[f"{key}.lokr_w1"] = torch.randn(small, small, generator=gen) * 0.1
                tensors[f"{key}.lokr_w2_a"] = torch.randn(dim // small, rank, generator=gen) * 0.1
                tensors[f"{key}.lokr_w2_b"] = torch.randn(rank, dim // small, generator=gen) / rank**0.5
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, file)
    return file
