"""Kohya/A1111 and LyCORIS adapter files as their trainers lay them out, and the formulas that define them.

The key layouts follow sd-scripts (`networks/lora.py`, `networks/lora_sd3.py`: `lora_unet_` / `lora_te_` /
`lora_te1_` / `lora_te2_` + the module path with dots as underscores, SGM block names for SDXL, a 0-d
`.alpha` per module in the save precision) and LyCORIS (`hada_*`, `lokr_*`, its `factorization`). The
references (`dense_delta`) are the formulas of the formats themselves, written here apart from the server's
code: LoRA alpha/r * up @ down, LoHa (w1a w1b) * (w2a w2b) * alpha/r, LoKr kron(w1, w2) * alpha/r.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# The metadata sd-scripts writes (A1111 reads it); strings only.
KOHYA_METADATA = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "1.0"}


def kohya_name(prefix: str, module: str) -> str:
    return f"{prefix}_{module.replace('.', '_')}"


def te_kohya_name(prefix: str, module: str) -> str:
    """Text-encoder names always carry text_model_ (as transformers < 5 named CLIP's modules)."""
    return kohya_name(prefix, module if module.startswith("text_model.") else f"text_model.{module}")


_RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}  # fmt: skip


def diffusers_to_sgm(name: str, unet_config: Any) -> str | None:
    """The SGM (original Stability) name of a diffusers UNet module, as sd-scripts names SDXL's."""
    lpb = unet_config.layers_per_block
    lpb = lpb[0] if isinstance(lpb, (list, tuple)) else lpb
    fixed = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2"}  # fmt: skip
    if name in fixed:
        return fixed[name]

    def resnet(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return _RESNET_SGM.get(head, head) + ("." + tail if tail else "")

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        index = 1 + int(m[1]) * (lpb + 1) + int(m[3])
        return f"input_blocks.{index}.0.{resnet(m[4])}" if m[2] == "resnets" else f"input_blocks.{index}.1.{m[4]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", name):
        return f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name):
        return f"middle_block.{2 * int(m[2])}.{resnet(m[3])}" if m[1] == "resnets" else f"middle_block.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        index = int(m[1]) * (lpb + 1) + int(m[3])
        return f"output_blocks.{index}.0.{resnet(m[4])}" if m[2] == "resnets" else f"output_blocks.{index}.1.{m[4]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", name):
        block = int(m[1])
        has_attention = "CrossAttn" in unet_config.up_block_types[block]
        return f"output_blocks.{block * (lpb + 1) + lpb}.{2 if has_attention else 1}.conv"
    return None


def _rand(g: torch.Generator, *shape: int, std: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std


def lora_parts(
    layer: nn.Module, rank: int, alpha: float | None, g: torch.Generator, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """lora_down / lora_up as sd-scripts writes them: Linear (r, in) / (out, r); Conv2d (r, in, kh, kw) /
    (out, r, 1, 1); `alpha` a 0-d tensor in the save precision (none: no alpha key)."""
    if isinstance(layer, nn.Conv2d):
        down, up = _rand(g, rank, layer.in_channels, *layer.kernel_size), _rand(g, layer.out_channels, rank, 1, 1)
    else:
        assert isinstance(layer, nn.Linear)
        down, up = _rand(g, rank, layer.in_features), _rand(g, layer.out_features, rank)
    parts = {"lora_down.weight": down.to(dtype), "lora_up.weight": up.to(dtype)}
    if alpha is not None:
        parts["alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return parts


def loha_parts(
    layer: nn.Module, rank: int, alpha: float, g: torch.Generator, tucker: bool = False
) -> dict[str, torch.Tensor]:
    """LyCORIS LoHa: hada_w?_a (out, r), hada_w?_b (r, in x kh x kw); Tucker convs: w?_a (r, out),
    w?_b (r, in), hada_t? (r, r, kh, kw)."""
    weight: torch.Tensor = layer.weight
    out, fan_in = weight.shape[0], math.prod(weight.shape[1:])
    if tucker:
        assert isinstance(layer, nn.Conv2d)
        kernel = layer.kernel_size
        return {
            "hada_w1_a": _rand(g, rank, out), "hada_w1_b": _rand(g, rank, layer.in_channels),
            "hada_t1": _rand(g, rank, rank, *kernel), "hada_w2_a": _rand(g, rank, out),
            "hada_w2_b": _rand(g, rank, layer.in_channels), "hada_t2": _rand(g, rank, rank, *kernel),
            "alpha": torch.tensor(float(alpha)),
        }  # fmt: skip
    return {
        "hada_w1_a": _rand(g, out, rank), "hada_w1_b": _rand(g, rank, fan_in),
        "hada_w2_a": _rand(g, out, rank), "hada_w2_b": _rand(g, rank, fan_in), "alpha": torch.tensor(float(alpha)),
    }  # fmt: skip


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS' factorization(): (m, n) with m <= n, m x n = dimension, m as close to `factor` as it divides."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


def lokr_parts(
    layer: nn.Module,
    rank: int,
    alpha: float,
    g: torch.Generator,
    *,
    factor: int = -1,
    decompose_both: bool = False,
    full: bool = False,
) -> dict[str, torch.Tensor]:
    """LyCORIS LoKr: lokr_w1 (a, c) [or w1_a (a, r) + w1_b (r, c)], lokr_w2_a (b, r) + lokr_w2_b (r, d x kh x kw)
    [or a full lokr_w2 (b, d[, kh, kw])], with out = a x b and in = c x d."""
    weight: torch.Tensor = layer.weight
    out, fan_in, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
    (a, b), (c, d) = factorization(out, factor), factorization(fan_in, factor)
    parts = {"alpha": torch.tensor(float(alpha))}
    if decompose_both and not full:
        parts["lokr_w1_a"], parts["lokr_w1_b"] = _rand(g, a, rank), _rand(g, rank, c)
    else:
        parts["lokr_w1"] = _rand(g, a, c)
    if full:
        parts["lokr_w2"] = _rand(g, b, d, *kernel, std=0.05)
    else:
        parts["lokr_w2_a"], parts["lokr_w2_b"] = _rand(g, b, rank), _rand(g, rank, d * math.prod(kernel))
    return parts


def flatten(modules: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{name: {role: tensor}} -> the file's {"name.role": tensor}."""
    return {f"{name}.{role}": t.contiguous() for name, parts in modules.items() for role, t in parts.items()}


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    return torch.einsum("i j ..., i p, j q -> p q ...", t, wa, wb)


def dense_delta(parts: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The delta W a module of a file defines (alpha / r applied), in the base weight's shape, float32."""
    p = {role: t.float() for role, t in parts.items()}
    alpha = float(p["alpha"]) if "alpha" in p else None
    if "lora_down.weight" in p:
        rank = p["lora_down.weight"].shape[0]
        if "lora_mid.weight" in p:
            w = torch.einsum(
                "i j ..., p i, j q -> p q ...",
                p["lora_mid.weight"],
                p["lora_up.weight"].flatten(1),
                p["lora_down.weight"].flatten(1),
            )
        else:
            w = p["lora_up.weight"].flatten(1) @ p["lora_down.weight"].flatten(1)
    elif "hada_w1_a" in p:
        rank = p["hada_w1_b"].shape[0]
        if "hada_t1" in p:
            w = _tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"]) * _tucker(
                p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"]
            )
        else:
            w = (p["hada_w1_a"] @ p["hada_w1_b"].flatten(1)) * (p["hada_w2_a"] @ p["hada_w2_b"].flatten(1))
    else:
        factored = p.get("lokr_w2_b", p.get("lokr_w1_b"))
        rank = factored.shape[0] if factored is not None else 0  # both factors full: no alpha
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"].flatten(1)
        w = torch.kron(w1, w2.flatten(1))
    scale = 1.0 if alpha is None or rank == 0 else alpha / rank
    return w.reshape(shape) * scale


@contextmanager
def merged(modules: Mapping[tuple[nn.Module, str], torch.Tensor], multiplier: float = 1.0) -> Iterator[None]:
    """Add each delta (times `multiplier`) into its module's weight for the body: the reference model."""
    originals = {}
    with torch.no_grad():
        for (root, name), delta in modules.items():
            weight = root.get_submodule(name).weight
            originals[(root, name)] = weight.detach().clone()
            weight.add_(delta.to(weight.dtype), alpha=multiplier)
    try:
        yield
    finally:
        with torch.no_grad():
            for (root, name), original in originals.items():
                root.get_submodule(name).weight.copy_(original)
