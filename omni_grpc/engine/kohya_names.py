"""Kohya / AUTOMATIC1111 / LyCORIS module names -> the pipeline's modules.

These files name an adapted module `<prefix>_<module path, dots as underscores>` (`lora_unet_...`,
`lora_te_...`, `lora_te1_...`, `lora_te2_...`, `lora_te3_...`); every algorithm (LoRA, LoHa, LoKr) names it
the same way and differs only after the first dot. So one mapping, built from the names alone (never from
tensor data), serves them all:

- UNet models (SD 1.x/2.x, SDXL) and CLIP text encoders: diffusers' own converters
  (`lora_conversion_utils._convert_non_diffusers_lora_to_diffusers`, SGM block renaming for SDXL, then
  `convert_unet_state_dict_to_peft` / `convert_state_dict_to_peft`), run on placeholder tensors that only
  carry the names: the module a key names is what diffusers would load it into.
- SD3 / SD3.5 (diffusers has no Kohya converter for it): sd-scripts' MMDiT names, mapped here, including its
  fused qkv (split into to_q / to_k / to_v by rows) and the adaLN halves that diffusers stores swapped.
- Everywhere: a module's diffusers name with dots as underscores (`lora_transformer_...` from OneTrainer,
  `lycoris_...` from LyCORIS' own wrapper, `lora_te3_...` for T5).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn


class Target(NamedTuple):
    """Where a file module's delta goes: a module of one pipeline component, all its rows or a slice of them
    (a fused qkv feeds three layers), optionally with the two halves of the rows exchanged. (A named tuple:
    a file makes one per module it adapts, and they key the model's memo of delta shapes.)"""

    component: str
    module: str
    rows: tuple[int, int] | None = None
    swap: bool = False


# Kohya prefixes of the text encoders: the pipeline component each names.
TEXT_ENCODER_PREFIXES = {"lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2",
                         "lora_te3": "text_encoder_3"}  # fmt: skip


def adaptable(module: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def flat_names(prefix: str, component: str, modules: Iterable[str]) -> dict[str, tuple[Target, ...]]:
    """`<prefix>_<name with dots as underscores>` for every module of a component."""
    return {f"{prefix}_{name.replace('.', '_')}": (Target(component, name),) for name in modules}


def unet_and_clip_names(
    names: Iterable[str], unet_config: Any | None, text_encoders: Mapping[str, Iterable[str]]
) -> dict[str, tuple[Target, ...]]:
    """Kohya names of a UNet ("lora_unet_") and CLIP text encoders ("lora_te[12]_") as diffusers converts them.

    `text_encoders` gives each text encoder component's module names (transformers writes CLIPTextModel's
    without `text_model.`, files always with it). Names diffusers cannot convert are left out.
    """
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    placeholders: dict[str, torch.Tensor] = {}
    name_of: dict[int, str] = {}  # the converters rename keys but keep the very tensor objects
    for name in names:
        if not name.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
            continue
        down, up = torch.empty(0, device="meta"), torch.empty(0, device="meta")
        placeholders[f"{name}.lora_down.weight"], placeholders[f"{name}.lora_up.weight"] = down, up
        name_of[id(down)] = name
    if not placeholders:
        return {}
    if unet_config is not None:
        placeholders = _maybe_map_sgm_blocks_to_diffusers(placeholders, unet_config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(placeholders)  # its alphas are not used: see README
    found: dict[str, tuple[Target, ...]] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in converted.items():
        component, _, rest = key.partition(".")
        parts.setdefault(component, {})[rest] = tensor
    for component, state in parts.items():
        if component == "unet":
            peft = convert_unet_state_dict_to_peft(state)
        else:
            # The types given, not inferred: diffusers infers the old layout only from an out_proj key, and
            # refuses (or drops the attention of) a text-encoder LoRA without one.
            diffusers_names = convert_state_dict_to_diffusers(state, original_type=StateDictType.DIFFUSERS_OLD)
            peft = convert_state_dict_to_peft(diffusers_names, original_type=StateDictType.DIFFUSERS)
            modules = set(text_encoders.get(component, ()))
        for key, tensor in peft.items():
            if not key.endswith(".lora_A.weight") or id(tensor) not in name_of:
                continue
            module = key.removesuffix(".lora_A.weight")
            if component != "unet" and module not in modules and module.removeprefix("text_model.") in modules:
                module = module.removeprefix("text_model.")  # as diffusers strips it for such models
            found[name_of[id(tensor)]] = (Target(component, module),)
    return found


def sd3_names(transformer: nn.Module, component: str = "transformer") -> dict[str, tuple[Target, ...]]:
    """sd-scripts' Kohya names of an SD3/SD3.5 MMDiT ("lora_unet_joint_blocks_0_x_block_attn_qkv", ...).

    Its fused qkv is the three projections stacked: rows [0, d), [d, 2d), [2d, 3d) of its delta go to to_q,
    to_k, to_v (add_q/k/v_proj for the context stream, attn2 for SD3.5's dual attention). The adaLN of the
    final layer and of the last (pre-only) context block hold (shift, scale) where diffusers holds (scale,
    shift): those deltas' halves are exchanged.
    """
    modules = adaptable(transformer)
    table: dict[str, tuple[Target, ...]] = {}

    def add(sd3_name: str, *targets: Target) -> None:
        if all(target.module in modules for target in targets):
            table[f"lora_unet_{sd3_name.replace('.', '_')}"] = targets

    def at(module: str, rows: tuple[int, int] | None = None, swap: bool = False) -> Target:
        return Target(component, module, rows, swap)

    add("x_embedder.proj", at("pos_embed.proj"))
    add("context_embedder", at("context_embedder"))
    add("t_embedder.mlp.0", at("time_text_embed.timestep_embedder.linear_1"))
    add("t_embedder.mlp.2", at("time_text_embed.timestep_embedder.linear_2"))
    add("y_embedder.mlp.0", at("time_text_embed.text_embedder.linear_1"))
    add("y_embedder.mlp.2", at("time_text_embed.text_embedder.linear_2"))
    add("final_layer.linear", at("proj_out"))
    add("final_layer.adaLN_modulation.1", at("norm_out.linear", swap=True))
    blocks: Any = transformer.transformer_blocks
    for i, block in enumerate(blocks):
        ours, theirs = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        d = block.attn.to_q.out_features
        thirds = ((0, d), (d, 2 * d), (2 * d, 3 * d))
        qkv = ("to_q", "to_k", "to_v")
        add(f"{theirs}.x_block.attn.qkv", *(at(f"{ours}.attn.{n}", r) for n, r in zip(qkv, thirds, strict=True)))
        add(f"{theirs}.x_block.attn.proj", at(f"{ours}.attn.to_out.0"))
        add(f"{theirs}.x_block.mlp.fc1", at(f"{ours}.ff.net.0.proj"))
        add(f"{theirs}.x_block.mlp.fc2", at(f"{ours}.ff.net.2"))
        add(f"{theirs}.x_block.adaLN_modulation.1", at(f"{ours}.norm1.linear"))
        if getattr(block, "attn2", None) is not None:
            attn2 = (at(f"{ours}.attn2.{n}", r) for n, r in zip(qkv, thirds, strict=True))
            add(f"{theirs}.x_block.attn2.qkv", *attn2)
            add(f"{theirs}.x_block.attn2.proj", at(f"{ours}.attn2.to_out.0"))
        context = ("add_q_proj", "add_k_proj", "add_v_proj")
        add(
            f"{theirs}.context_block.attn.qkv",
            *(at(f"{ours}.attn.{n}", r) for n, r in zip(context, thirds, strict=True)),
        )
        pre_only = bool(block.context_pre_only)
        if not pre_only:
            add(f"{theirs}.context_block.attn.proj", at(f"{ours}.attn.to_add_out"))
            add(f"{theirs}.context_block.mlp.fc1", at(f"{ours}.ff_context.net.0.proj"))
            add(f"{theirs}.context_block.mlp.fc2", at(f"{ours}.ff_context.net.2"))
        add(f"{theirs}.context_block.adaLN_modulation.1", at(f"{ours}.norm1_context.linear", swap=pre_only))
    return table


def text_encoder_flat_names(prefix: str, component: str, modules: Iterable[str]) -> dict[str, tuple[Target, ...]]:
    """Flat names of a text encoder, with and without `text_model.` (files write it, transformers may not)."""
    names = list(modules)
    table = flat_names(prefix, component, names)
    table.update(flat_names(prefix, component, (f"text_model.{n}" for n in names if not n.startswith("text_model."))))
    for key, targets in list(table.items()):
        target = targets[0]
        if target.module.startswith("text_model.") and target.module not in names:
            table[key] = (Target(component, target.module.removeprefix("text_model.")),)
    return table


# Kohya names of a file -> the targets each stands for (names it cannot map are left out).
KohyaTable = Callable[[Collection[str]], Mapping[str, tuple[Target, ...]]]


def unet_pipeline_names(unet: nn.Module, text_encoders: Mapping[str, nn.Module]) -> KohyaTable:
    """SD 1.x/2.x and SDXL: diffusers' converters for lora_unet_ / lora_te*_ (SGM block names included), then
    LyCORIS' own `lycoris_<diffusers name>` and flat diffusers names for what they leave out."""
    te_modules = {component: list(adaptable(module)) for component, module in text_encoders.items()}
    flat = flat_names("lycoris", "unet", adaptable(unet))
    flat.update(flat_names("lora_unet", "unet", adaptable(unet)))
    for prefix, component in TEXT_ENCODER_PREFIXES.items():
        if component in te_modules:
            flat.update(text_encoder_flat_names(prefix, component, te_modules[component]))
    config = getattr(unet, "config", None)

    def table(names: Collection[str]) -> Mapping[str, tuple[Target, ...]]:
        found = {name: flat[name] for name in names if name in flat}
        # The converters' answer wins where they have one: what diffusers would load the file into.
        found.update(unet_and_clip_names(names, config, te_modules))
        return found

    return table


def sd3_pipeline_names(transformer: nn.Module, text_encoders: Mapping[str, nn.Module]) -> KohyaTable:
    """SD3 / SD3.5: sd-scripts' MMDiT names, OneTrainer's lora_transformer_ and LyCORIS' lycoris_ diffusers
    names, and lora_te1_ / lora_te2_ / lora_te3_ for CLIP-L, CLIP-G and T5."""
    modules = adaptable(transformer)
    table = sd3_names(transformer)
    table.update(flat_names("lora_transformer", "transformer", modules))
    table.update(flat_names("lycoris", "transformer", modules))
    for prefix, component in TEXT_ENCODER_PREFIXES.items():
        if component in text_encoders and prefix != "lora_te":  # sd-scripts numbers SD3's three encoders
            table.update(text_encoder_flat_names(prefix, component, adaptable(text_encoders[component])))
    return lambda _names: table


def transformer_pipeline_names(transformer: nn.Module, text_encoders: Mapping[str, nn.Module]) -> KohyaTable:
    """Transformer families without sd-scripts names of their own here (Flux): OneTrainer's lora_transformer_
    and LyCORIS' lycoris_ diffusers names, and lora_te1_ / lora_te2_ for the text encoders."""
    modules = adaptable(transformer)
    table = flat_names("lora_transformer", "transformer", modules)
    table.update(flat_names("lycoris", "transformer", modules))
    for prefix, component in TEXT_ENCODER_PREFIXES.items():
        if component in text_encoders and prefix != "lora_te":
            table.update(text_encoder_flat_names(prefix, component, adaptable(text_encoders[component])))
    return lambda _names: table
