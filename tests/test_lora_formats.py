"""The LoRA files people have: Kohya/A1111 (UNet and text-encoder parts, per-module alphas), LyCORIS LoHa and
LoKr, diffusers' old attention-processor files, sd-scripts' SD3 files; each against diffusers' own loader where
it loads the file right, else against the format's formula, on tiny SD 1.5, SDXL and SD3 pipelines.

Engines run in this process (one per model); references are plain diffusers pipelines loaded from the same
folders and run with the same seeds. Images are compared as floats in [0, 1], before the 8-bit rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextModel

from omni_grpc.engine.engine import Engine
from omni_grpc.engine.kohya_names import sd3_names
from omni_grpc.engine.types import AdapterFormat, GenerateRequest, LoraRequest, SamplingParams
from omni_grpc.errors import FailedPrecondition, InvalidArgument, OmniError
from omni_grpc.tiny_models.sdxl import build_tiny_sdxl
from tests.helpers import started_engine
from tests.kohya_files import (
    KOHYA_METADATA,
    dense_delta,
    diffusers_to_sgm,
    flatten,
    kohya_name,
    loha_parts,
    lokr_parts,
    lora_parts,
    merged,
    te_kohya_name,
)
from tests.lora_factory import load_reference_pipeline
from tests.tiny_sd15 import build_tiny_sd15

PROMPT = "a piece of cheesecake"
NEGATIVE = "blurry"
STEPS = 2
ATOL = 1e-4

# SD 1.5 modules a Kohya file adapts: attention, feed-forward, 1x1 and 3x3 convs, a time embedding.
SD15_UNET = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.attentions.0.proj_in",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
    "up_blocks.1.attentions.0.proj_out",
    "down_blocks.0.resnets.0.conv1",
    "up_blocks.0.resnets.1.conv2",
    "down_blocks.1.resnets.0.time_emb_proj",
)
SD15_TE = (
    "encoder.layers.0.self_attn.q_proj",
    "encoder.layers.0.self_attn.k_proj",
    "encoder.layers.0.self_attn.v_proj",
    "encoder.layers.0.self_attn.out_proj",
    "encoder.layers.1.mlp.fc1",
    "encoder.layers.1.mlp.fc2",
)


# ---- models, engines and references -------------------------------------------------------------------------


def _pipe(cls: Any, folder: Path) -> Any:
    pipe = cls.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd15(tmp_path_factory.mktemp("sd15"))


@pytest.fixture(scope="module")
def sd15(sd15_dir: Path) -> Iterator[Engine]:
    with started_engine(model=str(sd15_dir), allow_any_lora_path=True, dtype="float32") as engine:
        yield engine


@pytest.fixture(scope="module")
def sd15_pipe(sd15_dir: Path) -> Any:
    return _pipe(StableDiffusionPipeline, sd15_dir)


def request(*loras: LoraRequest, seed: int = 3, size: int = 32) -> GenerateRequest:
    return GenerateRequest(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        sampling=SamplingParams(height=size, width=size, num_inference_steps=STEPS, seed=seed),
        loras=list(loras),
    )


def run(engine: Engine, *loras: LoraRequest, seed: int = 3, size: int = 32) -> np.ndarray:
    return np.asarray(engine.generate(request(*loras, seed=seed, size=size)).images[0].array)


def reference(pipe: Any, *, seed: int = 3, size: int = 32) -> np.ndarray:
    """What the diffusers pipeline itself makes of the same request."""
    out = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=size,
        width=size,
        num_inference_steps=STEPS,
        generator=[torch.Generator("cpu").manual_seed(seed)],
        output_type="np",
    )
    return np.asarray(out.images[0])


@contextmanager
def diffusers_loaded(pipe: Any, file: Path, scale: float = 1.0) -> Iterator[None]:
    """The file as diffusers' own `load_lora_weights` applies it."""
    pipe.load_lora_weights(str(file), adapter_name="ref")
    if scale != 1.0:
        pipe.set_adapters(["ref"], [scale])
    try:
        yield
    finally:
        pipe.unload_lora_weights()


@contextmanager
def loaded(engine: Engine, path: Path) -> Iterator[Any]:
    info, _ = engine.load_adapter(str(path))
    try:
        yield info
    finally:
        engine.unload_adapter(adapter_id=info.id)


def close(actual: np.ndarray, expected: np.ndarray, atol: float = ATOL) -> None:
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


# ---- Kohya / A1111 on SD 1.5 ----------------------------------------------------------------------------------


def sd15_kohya(pipe: Any, *, alphas: str, unet: bool = True, te: bool = True, seed: int = 1) -> dict[str, Any]:
    """What sd-scripts writes for SD 1.x (train_network.py, networks.lora), {name: {role: tensor}}.

    alphas: "uniform" (2 everywhere), "none" (no .alpha), "mixed" (--network_alpha 1 --conv_alpha 4 with two
    modules of other alphas and one of rank 8, as block-wise alphas write them)."""
    g = torch.Generator().manual_seed(seed)
    modules: dict[str, Any] = {}
    for i, name in enumerate(SD15_UNET if unet else ()):
        layer = pipe.unet.get_submodule(name)
        three = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
        alpha = {"uniform": 2.0, "none": None, "mixed": 4.0 if three else (8.0 if i == 1 else 0.5 if i == 6 else 1.0)}
        modules[kohya_name("lora_unet", name)] = lora_parts(layer, 8 if i == 4 else 4, alpha[alphas], g)
    for i, name in enumerate(SD15_TE if te else ()):
        alpha = {"uniform": 2.0, "none": None, "mixed": 2.0 if i in (1, 4) else 1.0}
        modules[te_kohya_name("lora_te", name)] = lora_parts(pipe.text_encoder.get_submodule(name), 4, alpha[alphas], g)
    return modules


def deltas_of(pipe: Any, modules: dict[str, Any], table: dict[str, tuple[nn.Module, str]]) -> dict[Any, torch.Tensor]:
    """The formula's delta for every module of a file, keyed by (model part, module) for `merged`."""
    out = {}
    for name, parts in modules.items():
        root, module = table[name]
        out[(root, module)] = dense_delta(parts, tuple(root.get_submodule(module).weight.shape))
    return out


def sd15_table(pipe: Any) -> dict[str, tuple[nn.Module, str]]:
    table = {kohya_name("lora_unet", n): (pipe.unet, n) for n in SD15_UNET}
    table.update({te_kohya_name("lora_te", n): (pipe.text_encoder, n) for n in SD15_TE})
    return table


@pytest.mark.parametrize("alphas", ["uniform", "none"])
def test_kohya_file_equals_diffusers_load_lora_weights(
    sd15: Engine, sd15_pipe: Any, tmp_path: Path, alphas: str
) -> None:
    file = write(tmp_path / "kohya.safetensors", flatten(sd15_kohya(sd15_pipe, alphas=alphas)), KOHYA_METADATA)
    with diffusers_loaded(sd15_pipe, file):
        expected = reference(sd15_pipe)
    with loaded(sd15, file) as info:
        assert info.format is AdapterFormat.KOHYA and info.components == ["denoiser", "text_encoder"]
        assert info.num_layers == len(SD15_UNET) + len(SD15_TE) and info.rank == 8
        got = run(sd15, LoraRequest(path=str(file)))
    close(got, expected)
    assert max_diff(got, run(sd15)) > 1e-2  # the adapter shows


def test_kohya_per_module_alphas_follow_the_formula_where_diffusers_does_not(
    sd15: Engine, sd15_pipe: Any, tmp_path: Path
) -> None:
    modules = sd15_kohya(sd15_pipe, alphas="mixed")
    file = write(tmp_path / "mixed.safetensors", flatten(modules), KOHYA_METADATA)
    with merged(deltas_of(sd15_pipe, modules, sd15_table(sd15_pipe)), 0.7):
        expected = reference(sd15_pipe)
    got = run(sd15, LoraRequest(path=str(file), scale=0.7))
    close(got, expected)
    # diffusers 0.42.1 gives the attention modules whose alpha differs from the most common one that common
    # alpha instead (README, "Where the server differs from diffusers"): visibly another image.
    with diffusers_loaded(sd15_pipe, file, 0.7):
        assert max_diff(reference(sd15_pipe), expected) > 1e-3


def test_text_encoder_parts_apply_per_request_in_one_batch(sd15: Engine, sd15_pipe: Any, tmp_path: Path) -> None:
    te_only = write(tmp_path / "te.safetensors", flatten(sd15_kohya(sd15_pipe, alphas="uniform", unet=False)))
    full = write(tmp_path / "full.safetensors", flatten(sd15_kohya(sd15_pipe, alphas="uniform", seed=2)))
    with diffusers_loaded(sd15_pipe, te_only):
        expected_te = reference(sd15_pipe, seed=5)
    asked = [
        request(LoraRequest(path=str(te_only)), seed=5),
        request(seed=6),
        request(LoraRequest(path=str(full), scale=0.6), seed=7),
    ]
    solo = [np.asarray(sd15.generate(r).images[0].array) for r in asked]
    together = sd15.generate_many(asked)
    assert [result.batch_size for result in together] == [3, 3, 3]  # one denoising batch, one text encoding
    for alone, batched in zip(solo, together, strict=True):
        close(np.asarray(batched.images[0].array), alone)
    # The text-encoder-only adapter is applied (the prompt and the negative prompt encoded with it), as diffusers
    # applies it; its batch mate without an adapter is the base model's image.
    close(solo[0], expected_te)
    assert max_diff(solo[0], run(sd15, seed=5)) > 1e-2
    close(np.asarray(together[1].images[0].array), reference(sd15_pipe, seed=6))
    assert [i.components for i in sd15.list_adapters() if i.path.endswith("te.safetensors")] == [["text_encoder"]]


@pytest.mark.parametrize("prefixed", [True, False])
def test_old_attention_processor_files(sd15: Engine, sd15_pipe: Any, tmp_path: Path, prefixed: bool) -> None:
    """diffusers <= 0.16 `save_attn_procs`: `...attn1.processor.to_q_lora.down.weight`, no alpha (scale 1);
    diffusers loads them only with the `unet.` prefix later writers added: unprefixed, we load them the same."""
    g = torch.Generator().manual_seed(4)
    tensors = {}
    for block in ("down_blocks.0.attentions.0.transformer_blocks.0", "up_blocks.1.attentions.1.transformer_blocks.0"):
        for attn in ("attn1", "attn2"):
            for proj, module in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
                layer = sd15_pipe.unet.get_submodule(f"{block}.{attn}.{module}")
                key = f"unet.{block}.{attn}.processor.{proj}_lora"
                tensors[f"{key}.down.weight"] = torch.randn(4, layer.in_features, generator=g) * 0.2
                tensors[f"{key}.up.weight"] = torch.randn(layer.out_features, 4, generator=g) * 0.2
    reference_file = write(tmp_path / "prefixed.safetensors", tensors)
    file = (
        reference_file
        if prefixed
        else write(tmp_path / "bare.safetensors", {k.removeprefix("unet."): v for k, v in tensors.items()})
    )
    with diffusers_loaded(sd15_pipe, reference_file):
        expected = reference(sd15_pipe)
    with loaded(sd15, file) as info:
        assert info.format is AdapterFormat.DIFFUSERS_OLD and info.num_layers == 16
        close(run(sd15, LoraRequest(path=str(file))), expected)


def lycoris_modules(pipe: Any, algorithm: str) -> dict[str, Any]:
    """LoHa or LoKr on the SD 1.5 modules (and two text-encoder ones), names as LyCORIS' kohya wrapper writes
    them, alphas per module; a Tucker LoHa on the 3x3 conv; LoKr factorised, decomposed both ways and full."""
    g = torch.Generator().manual_seed(8)
    picks = [(pipe.unet, "lora_unet", n) for n in SD15_UNET] + [(pipe.text_encoder, "lora_te", n) for n in SD15_TE[:2]]
    modules: dict[str, Any] = {}
    for i, (root, prefix, name) in enumerate(picks):
        layer = root.get_submodule(name)
        key = te_kohya_name(prefix, name) if prefix == "lora_te" else kohya_name(prefix, name)
        if algorithm == "loha":
            # Module 0's rank 8 x 8 is above its layer's width: its exact pair is the dense delta.
            rank = 8 if i == 0 else 4 if i % 2 else 2
            modules[key] = loha_parts(layer, rank, 1.0 + i % 3, g, tucker=i == 9)
        else:
            modules[key] = lokr_parts(
                layer, 2, 1.0 + i % 3, g, factor=4 if i % 4 == 0 else -1, decompose_both=i % 5 == 1, full=i == 3
            )
    return modules


@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_lycoris_files_equal_their_formulas(sd15: Engine, sd15_pipe: Any, tmp_path: Path, algorithm: str) -> None:
    modules = lycoris_modules(sd15_pipe, algorithm)
    file = write(tmp_path / f"{algorithm}.safetensors", flatten(modules))
    table = sd15_table(sd15_pipe)
    with merged(deltas_of(sd15_pipe, modules, table), 0.8):
        expected = reference(sd15_pipe)
    with loaded(sd15, file) as info:
        assert info.format is AdapterFormat.LYCORIS and info.components == ["denoiser", "text_encoder"]
        got = run(sd15, LoraRequest(path=str(file), scale=0.8))
    close(got, expected)
    assert max_diff(got, run(sd15)) > 1e-2


def test_a_file_written_by_diffusers_convert_state_dict_to_kohya(sd15: Engine, sd15_dir: Path, tmp_path: Path) -> None:
    """peft adapters on the UNet and the text encoder, converted by diffusers' own writer (integer alphas = r); the
    reference is the peft-adapted models themselves. (diffusers' load_lora_weights misses the text-encoder part of
    this very file: transformers 5 names CLIP's modules without `text_model.`, which its writer then leaves out.)"""
    torch.manual_seed(11)
    state: dict[str, torch.Tensor] = {}
    adapted: dict[str, nn.Module] = {}
    for component, cls, targets in (
        ("unet", UNet2DConditionModel, ["to_q", "to_v", "proj_in"]),
        ("text_encoder", CLIPTextModel, ["q_proj", "fc1"]),
    ):
        adapted[component] = cls.from_pretrained(str(sd15_dir / component))
        model = get_peft_model(
            adapted[component], LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian")
        )
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0.0, 0.3)
        prefix = "base_model.model."
        state.update({f"{component}.{k.removeprefix(prefix)}": v for k, v in get_peft_model_state_dict(model).items()})
    tensors = convert_state_dict_to_kohya(state)
    assert any(t.dtype == torch.int64 for t in tensors.values())  # what diffusers writes for alpha
    file = write(tmp_path / "converted.safetensors", tensors)
    pipe = StableDiffusionPipeline.from_pretrained(str(sd15_dir), local_files_only=True, **adapted)
    pipe.set_progress_bar_config(disable=True)
    expected = reference(pipe)
    with loaded(sd15, file) as info:
        assert info.format is AdapterFormat.KOHYA and info.components == ["denoiser", "text_encoder"]
        close(run(sd15, LoraRequest(path=str(file))), expected)


# ---- what stays refused ----------------------------------------------------------------------------------------


def refused(engine: Engine, tensors: dict[str, torch.Tensor], tmp_path: Path, kind: type[OmniError]) -> str:
    file = write(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(OmniError) as info:
        engine.load_adapter(str(file))
    assert type(info.value) is kind and str(file) in info.value.message
    return info.value.message


def one_module(pipe: Any, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    name = kohya_name("lora_unet", SD15_UNET[0])
    parts = lora_parts(pipe.unet.get_submodule(SD15_UNET[0]), 4, 4.0, torch.Generator().manual_seed(0))
    return flatten({name: {**parts, **extra}})


def test_dora_and_other_lycoris_kinds_are_refused_naming_the_feature_and_key(
    sd15: Engine, sd15_pipe: Any, tmp_path: Path
) -> None:
    name = kohya_name("lora_unet", SD15_UNET[0])
    message = refused(sd15, one_module(sd15_pipe, dora_scale=torch.ones(32, 1)), tmp_path, FailedPrecondition)
    assert f"'{name}.dora_scale' is DoRA" in message and "does not apply" in message
    oft = {f"{name}.oft_blocks": torch.zeros(4, 8, 8), f"{name}.alpha": torch.tensor(1.0)}
    assert f"'{name}.oft_blocks' is OFT/BOFT" in refused(sd15, oft, tmp_path, FailedPrecondition)
    scale = one_module(sd15_pipe, scale=torch.tensor(0.5))
    assert "(a fixed scale that overrides alpha) is not supported" in refused(sd15, scale, tmp_path, FailedPrecondition)


@pytest.mark.parametrize("kohya", [False, True])
def test_a_module_named_with_and_without_text_model_is_refused(
    sd15: Engine, sd15_pipe: Any, tmp_path: Path, kohya: bool
) -> None:
    """transformers 5 names CLIP's modules without `text_model.`, and files may name them with it: one file that
    names one encoder module both ways would adapt it twice, and is refused naming both, never half applied."""
    module = "encoder.layers.0.self_attn.q_proj"
    assert not hasattr(sd15_pipe.text_encoder, "text_model")  # (the premise: this encoder's modules lack it)
    layer = sd15_pipe.text_encoder.get_submodule(module)
    g = torch.Generator().manual_seed(0)
    names = [f"text_model.{module}", module]
    if kohya:
        tensors = flatten({kohya_name("lora_te", name): lora_parts(layer, 4, 4.0, g) for name in names})
    else:
        tensors = {
            f"text_encoder.{name}.lora_{role}.weight": torch.randn(shape, generator=g)
            for name in names
            for role, shape in (("A", (4, layer.in_features)), ("B", (layer.out_features, 4)))
        }
    message = refused(sd15, tensors, tmp_path, InvalidArgument)
    if kohya:  # (Kohya names are turned into the model's own as the layout is read: refused there)
        assert f"adapts text_encoder '{module}', which another module of the file adapts already" in message
    else:
        assert f"adapts text_encoder module '{module}' twice, as '{module}' and as 'text_model.{module}'" in message


def test_unknown_keys_name_the_first_key_and_the_formats_tried(sd15: Engine, tmp_path: Path) -> None:
    tensors = {"model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.zeros(4, 4), "zzz": torch.zeros(1)}
    message = refused(sd15, tensors, tmp_path, InvalidArgument)
    assert "its keys follow no adapter layout this server reads (first: 'model.diffusion_model.input_blocks" in message
    assert "tried PEFT, diffusers, diffusers' old attention-processor layout, Kohya/A1111 and LyCORIS" in message


def test_a_unet_only_file_that_does_not_fit_names_its_module(sd15: Engine, sd15_pipe: Any, tmp_path: Path) -> None:
    layer = sd15_pipe.unet.get_submodule(SD15_UNET[0])
    g = torch.Generator().manual_seed(0)
    absent = flatten({"lora_unet_down_blocks_7_attentions_0_proj_in": lora_parts(layer, 4, 4.0, g)})
    message = refused(sd15, absent, tmp_path, FailedPrecondition)
    assert "does not fit the base model" in message and "text-encoder" not in message and "text_encoder" not in message
    assert "down_blocks.7.attentions.0.proj_in" in message or "lora_unet_down_blocks_7_attentions_0_proj_in" in message
    wrong = one_module(sd15_pipe)
    wrong[f"{kohya_name('lora_unet', SD15_UNET[0])}.lora_up.weight"] = torch.zeros(31, 4)
    message = refused(sd15, wrong, tmp_path, FailedPrecondition)
    assert f"module '{kohya_name('lora_unet', SD15_UNET[0])}' expects lora_A [4, 32] and lora_B [32, 4]" in message
    loha = flatten({kohya_name("lora_unet", SD15_UNET[0]): loha_parts(nn.Linear(16, 32), 2, 1.0, g)})
    message = refused(sd15, loha, tmp_path, FailedPrecondition)
    assert "(loha) has hada_w1_b" in message and "the layer needs [2, 32]" in message


def test_bad_values_are_refused_naming_the_key(sd15: Engine, sd15_pipe: Any, tmp_path: Path) -> None:
    name = kohya_name("lora_unet", SD15_UNET[0])
    vector_alpha = one_module(sd15_pipe)
    vector_alpha[f"{name}.alpha"] = torch.ones(3)
    assert "an alpha is one number" in refused(sd15, vector_alpha, tmp_path, InvalidArgument)
    g = torch.Generator().manual_seed(0)
    loha = loha_parts(sd15_pipe.unet.get_submodule(SD15_UNET[0]), 2, 1.0, g)
    loha["hada_w2_a"][0, 0] = float("nan")
    message = refused(sd15, flatten({name: loha}), tmp_path, InvalidArgument)
    assert f"tensor '{name}.hada_w2_a' contains NaN or Inf" in message
    huge = one_module(sd15_pipe)
    huge[f"{name}.alpha"] = torch.tensor(1e6)
    assert "gives module" in refused(sd15, huge, tmp_path, InvalidArgument)


def test_every_inner_rank_of_a_lycoris_module_is_capped(sd15: Engine, sd15_pipe: Any, tmp_path: Path) -> None:
    """A LoHa's second rank and a factorised LoKr w1's inner size count against --max-lora-rank (256), like the
    first: neither may make the server build a huge product."""
    name = kohya_name("lora_unet", SD15_UNET[0])
    layer = sd15_pipe.unet.get_submodule(SD15_UNET[0])
    g = torch.Generator().manual_seed(1)
    loha = loha_parts(layer, 2, 1.0, g)
    loha["hada_w2_a"], loha["hada_w2_b"] = torch.zeros(32, 300), torch.zeros(300, 32)
    message = refused(sd15, flatten({name: loha}), tmp_path, InvalidArgument)
    assert f"tensor '{name}.hada_w2_b' has rank 300, above this server's limit of 256" in message
    lokr = lokr_parts(layer, 2, 1.0, g, decompose_both=True)
    a, c = lokr["lokr_w1_a"].shape[0], lokr["lokr_w1_b"].shape[1]
    lokr["lokr_w1_a"], lokr["lokr_w1_b"] = torch.zeros(a, 300), torch.zeros(300, c)
    message = refused(sd15, flatten({name: lokr}), tmp_path, InvalidArgument)
    assert f"tensor '{name}.lokr_w1_b' has rank 300, above this server's limit of 256" in message


# ---- SDXL: SGM block names, two text encoders -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def sdxl(sdxl_dir: Path) -> Iterator[Engine]:
    with started_engine(model=str(sdxl_dir), allow_any_lora_path=True, dtype="float32") as engine:
        yield engine


def sdxl_kohya(pipe: Any, *, mixed: bool) -> tuple[dict[str, Any], dict[str, tuple[nn.Module, str]]]:
    """sd-scripts' SDXL layout: lora_unet_ + SGM block names, lora_te1_ (CLIP-L), lora_te2_ (CLIP-G)."""
    g = torch.Generator().manual_seed(6)
    kinds = ("attn1.to_q", "attn2.to_k", "attn1.to_out.0", "ff.net.2", "proj_in", "resnets.0.conv1", "time_emb_proj",
             "downsamplers", "upsamplers", "add_embedding.linear_1")  # fmt: skip
    modules: dict[str, Any] = {}
    table: dict[str, tuple[nn.Module, str]] = {}
    picks = [
        n for n, m in pipe.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and any(k in n for k in kinds)
    ]
    for i, name in enumerate(picks):
        layer = pipe.unet.get_submodule(name)
        three = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
        alpha = (4.0 if three else 8.0 if i % 7 == 3 else 1.0) if mixed else 2.0
        sgm = diffusers_to_sgm(name, pipe.unet.config)
        assert sgm is not None
        key = kohya_name("lora_unet", sgm)
        modules[key], table[key] = lora_parts(layer, 4, alpha, g), (pipe.unet, name)
    for prefix, encoder in (("lora_te1", pipe.text_encoder), ("lora_te2", pipe.text_encoder_2)):
        names = [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear) and "layers.0." in n]
        for j, name in enumerate(names):
            key = te_kohya_name(prefix, name)
            alpha = (2.0 if j in (1, 4) else 1.0) if mixed else 2.0
            modules[key], table[key] = lora_parts(encoder.get_submodule(name), 4, alpha, g), (encoder, name)
    return modules, table


def test_sdxl_kohya_files(sdxl: Engine, sdxl_dir: Path, tmp_path: Path) -> None:
    pipe = _pipe(StableDiffusionXLPipeline, sdxl_dir)
    uniform, _ = sdxl_kohya(pipe, mixed=False)
    file = write(tmp_path / "sdxl.safetensors", flatten(uniform), KOHYA_METADATA)
    with diffusers_loaded(pipe, file):
        expected = reference(pipe, size=64)
    with loaded(sdxl, file) as info:
        assert info.components == ["denoiser", "text_encoder", "text_encoder_2"] and info.num_layers == len(uniform)
        close(run(sdxl, LoraRequest(path=str(file)), size=64), expected)
    mixed, table = sdxl_kohya(pipe, mixed=True)
    file = write(tmp_path / "sdxl_mixed.safetensors", flatten(mixed), KOHYA_METADATA)
    with merged(deltas_of(pipe, mixed, table)):
        expected = reference(pipe, size=64)
    close(run(sdxl, LoraRequest(path=str(file)), size=64), expected)


# ---- SD3: sd-scripts' MMDiT names, checked against diffusers' own single-file converter --------------------------


@pytest.fixture(scope="module")
def sd3(model_dir: Path) -> Iterator[Engine]:
    with started_engine(model=str(model_dir), allow_any_lora_path=True, dtype="float32") as engine:
        yield engine


def sd3_original_names(transformer: nn.Module) -> dict[str, str]:
    """sd-scripts' Kohya names -> the original (Stability) MMDiT module names they stand for."""
    names = ["x_embedder.proj", "context_embedder", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0",
             "y_embedder.mlp.2", "final_layer.linear", "final_layer.adaLN_modulation.1"]  # fmt: skip
    blocks: Any = transformer.transformer_blocks
    for i in range(len(blocks)):
        for stream in ("x_block", "context_block"):
            for leaf in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
                names.append(f"joint_blocks.{i}.{stream}.{leaf}")
    return {kohya_name("lora_unet", n): n for n in names}


def test_sd3_sd_scripts_file_equals_diffusers_single_file_conversion(
    sd3: Engine, model_dir: Path, tmp_path: Path
) -> None:
    """diffusers has no Kohya loader for SD3 (its load_lora_weights loads nothing from these files). The reference
    is diffusers' converter of original SD3 checkpoints: the file's fused deltas added to the original-format
    weights, converted to diffusers' layout (splitting qkv, swapping the adaLN halves it stores swapped)."""
    pipe = load_reference_pipeline(model_dir)
    transformer = pipe.transformer
    weights = {k: v.clone() for k, v in transformer.state_dict().items()}
    table, originals = sd3_names(transformer), sd3_original_names(transformer)
    # The original checkpoint, assembled from the server's table; diffusers' converter must give the model back.
    original = {"pos_embed": weights["pos_embed.pos_embed"]}
    for name, targets in table.items():
        for suffix in ("weight", "bias"):
            parts = []
            for target in targets:
                x = weights[f"{target.module}.{suffix}"]
                parts.append(torch.cat(x.chunk(2)[::-1]) if target.swap else x)
            original[f"{originals[name]}.{suffix}"] = torch.cat(parts)
    back = convert_sd3_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in original.items()})
    assert set(back) == set(weights) and all(torch.equal(back[k], weights[k]) for k in weights)
    # Every sd-scripts module of the model (fused qkv included), alphas varying, plus CLIP-L / CLIP-G parts.
    g = torch.Generator().manual_seed(12)
    modules: dict[str, Any] = {}
    for j, name in enumerate(sorted(table)):
        shape = original[f"{originals[name]}.weight"].shape
        layer = nn.Conv2d(shape[1], shape[0], shape[2:]) if len(shape) == 4 else nn.Linear(shape[1], shape[0])
        modules[name] = lora_parts(layer, 4, (1.0, 3.0, 8.0)[j % 3], g)
        original[f"{originals[name]}.weight"] = original[f"{originals[name]}.weight"] + dense_delta(
            modules[name], tuple(shape)
        )
    te_deltas = {}
    for prefix, encoder in (("lora_te1", pipe.text_encoder), ("lora_te2", pipe.text_encoder_2)):
        for leaf in ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc2"):
            # CLIPTextModelWithProjection keeps `text_model.`; transformers 5's CLIPTextModel does not.
            module = next(n for n, _ in encoder.named_modules() if n.endswith(leaf))
            key = te_kohya_name(prefix, module)
            modules[key] = lora_parts(encoder.get_submodule(module), 4, 2.0, g)
            te_deltas[(encoder, module)] = dense_delta(modules[key], tuple(encoder.get_submodule(module).weight.shape))
    converted = convert_sd3_transformer_checkpoint_to_diffusers(original)
    file = write(tmp_path / "sd3.safetensors", flatten(modules), KOHYA_METADATA)
    with torch.no_grad():
        transformer.load_state_dict(converted)
    with merged(te_deltas):
        expected = reference(pipe, size=64)
    with loaded(sd3, file) as info:
        assert info.format is AdapterFormat.KOHYA
        assert info.components == ["denoiser", "text_encoder", "text_encoder_2"]
        got = run(sd3, LoraRequest(path=str(file)), size=64)
    close(got, expected)
    assert max_diff(got, run(sd3, size=64)) > 1e-2


def test_sd3_diffusers_named_kohya_and_missing_t5(sd3: Engine, model_dir: Path, tmp_path: Path) -> None:
    """OneTrainer's `lora_transformer_<diffusers name>` and LyCORIS' `lycoris_<diffusers name>`; a T5 part
    (`lora_te3_`) on a model served without T5 is refused naming the part."""
    pipe = load_reference_pipeline(model_dir)
    g = torch.Generator().manual_seed(13)
    modules, deltas = {}, {}
    picks = (
        ("lora_transformer", "transformer_blocks.0.attn.to_q"),
        ("lora_transformer", "transformer_blocks.0.attn.add_k_proj"),
        ("lycoris", "transformer_blocks.1.ff.net.2"),
        ("lora_transformer", "transformer_blocks.0.norm1_context.linear"),
    )
    for j, (prefix, name) in enumerate(picks):
        layer = pipe.transformer.get_submodule(name)
        modules[kohya_name(prefix, name)] = lora_parts(layer, 4, 1.0 + j, g)
        deltas[(pipe.transformer, name)] = dense_delta(modules[kohya_name(prefix, name)], tuple(layer.weight.shape))
    file = write(tmp_path / "onetrainer.safetensors", flatten(modules))
    with merged(deltas, 1.5):
        expected = reference(pipe, size=64)
    close(run(sd3, LoraRequest(path=str(file), scale=1.5), size=64), expected)
    t5 = flatten({"lora_te3_encoder_block_0_layer_0_SelfAttention_q": lora_parts(nn.Linear(8, 8), 2, 2.0, g)})
    message = refused(sd3, t5, tmp_path, FailedPrecondition)
    assert "adapts text_encoder_3, which this model does not have" in message
