"""Every adapter module as one exact low-rank pair (A, B), whatever its file's algorithm: delta W = B @ A.

- LoRA / LoCon: A = lora_down, B = lora_up; with a Tucker core (lora_mid), A = mid convolved with down.
- LyCORIS LoHa: delta W = (w1a w1b) * (w2a w2b) (Hadamard product), which is exactly the Khatri-Rao pair
  B[:, (i, j)] = w1a[:, i] * w2a[:, j], A[(i, j), :] = w1b[i] * w2b[j] of rank r1 * r2; Tucker factors first.
- LyCORIS LoKr: delta W = kron(w1, w2) with either factor possibly a product (w1a w1b, w2a w2b), which is
  exactly B = kron(w1, w2a), A = kron(I, w2b) when w2 is factorised; otherwise delta W itself, as the pair
  (B = I, A = delta W) or (B = delta W, A = I) on its smaller side.

A pair's rank never exceeds min(out, in x kernel): beyond, the dense delta is the cheaper exact pair. So the
per-sample hooks apply every format unchanged, and the scale (alpha / r) stays outside, as for LoRA.
Shapes are checked from the header alone (`pair_shapes`), before any tensor is read.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import NamedTuple

import torch

# The tensors of each algorithm, by their role (the part of a Kohya key after the module name).
LORA_ROLES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
DOWN, UP = LORA_ROLES[:2]  # a LoRA pair's roles
LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
ALGORITHMS = {"lora": LORA_ROLES, "loha": LOHA_ROLES, "lokr": LOKR_ROLES}

Shape = tuple[int, ...]


class ModuleFit(NamedTuple):
    """How one module of a file goes into the model: the shape of the weight its delta is for (all its target
    rows counted), and the shapes of its exact pair (A, B)."""

    weight: Shape
    a: Shape
    b: Shape


class NotAPair(ValueError):
    """The module's tensors do not make a delta of the layer's shape (the message says how)."""


def algorithm_of(roles: Sequence[str]) -> str | None:
    """Which algorithm a module's tensor roles belong to (alpha aside), or None when they match none."""
    present = set(roles)
    for name, allowed in ALGORITHMS.items():
        if present and present <= set(allowed):
            return name
    return None


def rank_role(algorithm: str, roles: Collection[str]) -> str | None:
    """The tensor whose first dimension is the rank a module declares; None for a LoKr of two full factors."""
    if algorithm == "lora":
        return "lora_down.weight"
    if algorithm == "loha":
        return "hada_w1_b"
    # A1111 and diffusers read w2_b first
    return next((role for role in ("lokr_w2_b", "lokr_w1_b") if role in roles), None)


# The factors whose first dimension is an inner rank of the module (each one is capped by --max-lora-rank).
_INNER_ROLES = ("lora_down.weight", "hada_w1_b", "hada_w2_b", "lokr_w1_b", "lokr_w2_b", "lokr_t2")


def inner_ranks(shapes: Mapping[str, Shape]) -> dict[str, int]:
    """Every inner rank a module's factors have, by role: a LoHa has two, a LoKr one per factorised factor."""
    return {role: shapes[role][0] for role in _INNER_ROLES if shapes.get(role)}


def pair_shapes(algorithm: str, shapes: Mapping[str, Shape], weight: Shape) -> tuple[Shape, Shape]:
    """The shapes of the exact pair (A, B) for a layer whose weight is `weight` ((out, in) or (out, in, kh,
    kw), out counting every target row of a fused module); NotAPair when the tensors cannot make it."""
    if algorithm == "lora" and len(shapes) == 2:
        given = given_pair(shapes.get("lora_down.weight"), shapes.get("lora_up.weight"), weight)
        if given is not None:
            return given
    out, fan_in, kernel = weight[0], math.prod(weight[1:]), weight[2:]
    rank = _pair_rank(algorithm, shapes, out, fan_in, kernel)
    full = min(out, fan_in)
    rank = min(rank, full) if rank > full else rank
    a_shape = (rank, *weight[1:])
    b_shape = (out, rank, *((1,) * len(kernel)))
    return a_shape, b_shape


def given_pair(down: Shape | None, up: Shape | None, weight: Shape) -> tuple[Shape, Shape] | None:
    """The common case, a LoRA of a Linear whose two tensors already are its exact pair: nothing to work out
    (None: any other case, for `pair_shapes`)."""
    if down is None or up is None or len(weight) != 2 or len(down) != 2 or down[1] != weight[1]:
        return None
    if down[0] > min(weight) or tuple(up) != (weight[0], down[0]):
        return None
    return tuple(down), tuple(up)


def _need(shapes: Mapping[str, Shape], *roles: str) -> None:
    missing = [role for role in roles if role not in shapes]
    if missing:
        raise NotAPair(f"has no {' and no '.join(missing)}")


def _expect(what: str, got: Shape, want: Shape) -> None:
    if tuple(got) != tuple(want):
        raise NotAPair(f"has {what} {list(got)}, the layer needs {list(want)}")


def _pair_rank(algorithm: str, s: Mapping[str, Shape], out: int, fan_in: int, kernel: Shape) -> int:
    """Check the tensors against the layer; the rank of their exact pair."""
    if not kernel:  # a Linear layer: files trained on a 1x1-conv variant of it store (r, in, 1, 1)
        s = {role: shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape for role, shape in s.items()}
    ones = (1,) * len(kernel)
    if algorithm == "lora":
        _need(s, "lora_down.weight", "lora_up.weight")
        rank = s["lora_down.weight"][0]
        in_channels = fan_in // math.prod(kernel) if kernel else fan_in
        _expect("lora_up", s["lora_up.weight"], (out, rank, *ones))
        if "lora_mid.weight" in s:  # Tucker: 1x1 down, (r, r, kh, kw) mid, 1x1 up
            _expect("lora_down", s["lora_down.weight"], (rank, in_channels, *ones))
            _expect("lora_mid", s["lora_mid.weight"], (rank, rank, *kernel))
        else:
            _expect("lora_down", s["lora_down.weight"], (rank, in_channels, *kernel))
        return rank
    if algorithm == "loha":
        _need(s, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        r1, r2 = s["hada_w1_b"][0], s["hada_w2_b"][0]
        if "hada_t1" in s or "hada_t2" in s:  # Tucker: w?_a (r, out), w?_b (r, in), t? (r, r, kh, kw)
            _need(s, "hada_t1", "hada_t2")
            in_channels = fan_in // math.prod(kernel)
            for i, r in ((1, r1), (2, r2)):
                _expect(f"hada_w{i}_a", s[f"hada_w{i}_a"], (r, out))
                _expect(f"hada_w{i}_b", s[f"hada_w{i}_b"], (r, in_channels))
                _expect(f"hada_t{i}", s[f"hada_t{i}"], (r, r, *kernel))
        else:  # w?_a (out, r), w?_b (r, in x kernel), flat
            for i, r in ((1, r1), (2, r2)):
                _expect(f"hada_w{i}_a", s[f"hada_w{i}_a"], (out, r))
                _expect(f"hada_w{i}_b", (s[f"hada_w{i}_b"][0], math.prod(s[f"hada_w{i}_b"][1:])), (r, fan_in))
        return r1 * r2
    # LoKr: out = a * b, in x kernel = c * (d x kernel)
    w1 = _factor(s, "lokr_w1")
    if "lokr_w2" in s:
        w2 = (s["lokr_w2"][0], math.prod(s["lokr_w2"][1:]))
        w2_rank = None
    elif "lokr_t2" in s:
        _need(s, "lokr_w2_a", "lokr_w2_b")
        w2_rank = s["lokr_t2"][0]
        w2 = (s["lokr_w2_a"][1], s["lokr_w2_b"][1] * math.prod(s["lokr_t2"][2:]))
        _expect("lokr_t2", s["lokr_t2"], (w2_rank, w2_rank, *kernel))
    else:
        w2 = _factor(s, "lokr_w2")
        w2_rank = s["lokr_w2_a"][1]
    if w1[0] * w2[0] != out or w1[1] * w2[1] != fan_in:
        raise NotAPair(
            f"makes a {w1[0] * w2[0]}x{w1[1] * w2[1]} delta (kron of {list(w1)} and {list(w2)}), "
            f"the layer needs {out}x{fan_in}"
        )
    if w2_rank is not None and "lokr_t2" not in s:
        return w1[1] * w2_rank  # B = kron(w1, w2a), A = kron(I_c, w2b)
    return min(out, fan_in)  # dense


def _factor(s: Mapping[str, Shape], name: str) -> tuple[int, int]:
    """The (rows, cols) a LoKr factor has, full or as a product of two."""
    if name in s:
        return s[name][0], math.prod(s[name][1:])
    _need(s, f"{name}_a", f"{name}_b")
    a, b = s[f"{name}_a"], s[f"{name}_b"]
    if a[1] != b[0]:
        raise NotAPair(f"has {name}_a {list(a)} and {name}_b {list(b)}, which do not multiply")
    return a[0], math.prod(b[1:])


# A LoKr's delta as its factors (w1, down, up): delta W = kron(w1, up @ down), or kron(w1, down) when up is None.
Kron = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def kron_factors(tensors: Mapping[str, torch.Tensor], weight: Shape) -> Kron | None:
    """A LoKr of a Linear layer as its Kronecker factors, float32, where applying them (w1 X w2^T on each row's
    input X viewed as (c, d)) costs well under its exact pair (rank c x r, or the dense delta); else None (a
    conv or Tucker LoKr, or one whose w1 is so tall that the pair is as cheap). `tensors` made that pair."""
    if len(weight) != 2 or "lokr_t2" in tensors:
        return None
    t = {role: tensor.float().flatten(1) for role, tensor in tensors.items() if role.startswith("lokr_w")}
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    down, up = (t["lokr_w2"], None) if "lokr_w2" in t else (t["lokr_w2_b"], t["lokr_w2_a"])
    (a, c), (r, d) = w1.shape, down.shape
    b = up.shape[0] if up is not None else r
    applied = c * d * r + a * c * r + (a * b * r if up is not None else 0)  # per row: down, mix, up
    pair_rank = min(c * r, weight[0], weight[1])
    if 2 * applied > pair_rank * (weight[0] + weight[1]):
        return None
    return w1.contiguous(), down.contiguous(), up.contiguous() if up is not None else None


def kron_bytes(shapes: Mapping[str, Shape]) -> int:
    """At most what `kron_factors` allocates for a LoKr of these shapes (float32 w1, down and up)."""
    w1 = shapes["lokr_w1"] if "lokr_w1" in shapes else (shapes["lokr_w1_a"][0], *shapes["lokr_w1_b"][1:])
    w2 = [shape for role, shape in shapes.items() if role.startswith("lokr_w2")]
    return 4 * (math.prod(w1) + sum(math.prod(shape) for shape in w2))


def exact_pair(algorithm: str, tensors: Mapping[str, torch.Tensor], weight: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact pair (A, B), float32, shaped as `pair_shapes` says (the scale is not applied)."""
    t = {role: tensor.float() for role, tensor in tensors.items()}
    out, fan_in, kernel = weight[0], math.prod(weight[1:]), weight[2:]
    a: torch.Tensor | None
    b: torch.Tensor
    if algorithm == "lora":
        down, up = t["lora_down.weight"], t["lora_up.weight"].flatten(1)
        if "lora_mid.weight" in t:  # the 1x1 down, then the core's convolution: one conv of their product
            a = torch.einsum("i j ..., j q -> i q ...", t["lora_mid.weight"], down.flatten(1)).flatten(1)
        else:
            a = down.flatten(1)
        b = up
    elif algorithm == "loha":
        if "hada_t1" in t:
            m1 = torch.einsum("i j ..., j q -> i q ...", t["hada_t1"], t["hada_w1_b"]).flatten(1)
            m2 = torch.einsum("i j ..., j q -> i q ...", t["hada_t2"], t["hada_w2_b"]).flatten(1)
            a1, a2 = t["hada_w1_a"].t(), t["hada_w2_a"].t()
        else:
            m1, m2 = t["hada_w1_b"].flatten(1), t["hada_w2_b"].flatten(1)
            a1, a2 = t["hada_w1_a"], t["hada_w2_a"]
        if a1.shape[1] * a2.shape[1] > min(out, fan_in):  # the dense delta is smaller: never build the product pair
            b, a = (a1 @ m1) * (a2 @ m2), None
        else:
            b = (a1[:, :, None] * a2[:, None, :]).reshape(out, -1)
            a = (m1[:, None, :] * m2[None, :, :]).reshape(-1, fan_in)
    else:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2_a" in t and "lokr_t2" not in t:
            b = torch.kron(w1.flatten(1), t["lokr_w2_a"])
            a = torch.kron(torch.eye(w1.shape[1]), t["lokr_w2_b"].flatten(1))
        else:
            if "lokr_w2" in t:
                w2 = t["lokr_w2"].flatten(1)
            else:
                w2 = torch.einsum("i j ..., i p, j q -> p q ...", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
                w2 = w2.flatten(1)
            b, a = torch.kron(w1.flatten(1), w2), None  # the dense delta
    if a is None or a.shape[0] > min(out, fan_in):
        delta = b @ a if a is not None else b
        b, a = (torch.eye(out), delta) if out <= fan_in else (delta, torch.eye(fan_in))
    a = a.reshape(a.shape[0], *weight[1:]).contiguous()
    b = b.reshape(out, b.shape[1], *((1,) * len(kernel))).contiguous()
    return a, b
