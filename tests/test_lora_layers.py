"""Per-sample LoRA on one model part (engine/lora_layers.py), on plain torch modules: every row gets its own
adapters' delta, and the work per adapted layer does not grow with the mix of adapters in the batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from omni_grpc.engine import adapter_math
from omni_grpc.engine.lora_layers import AdapterSlot, MultiLora

IN, OUT, RANKS = 12, 10, (2, 3, 4, 5, 2, 3, 4, 5)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, OUT)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(x), self.conv(image)


def slots(multi: MultiLora, count: int) -> list[AdapterSlot]:
    g = torch.Generator().manual_seed(0)
    made = []
    for i in range(count):
        r = RANKS[i]
        made.append(
            multi.make_slot(
                {
                    "proj": (torch.randn(r, IN, generator=g), torch.randn(OUT, r, generator=g), 0.5 + i),
                    "conv": (torch.randn(r, 3, 3, 3, generator=g), torch.randn(4, r, 1, 1, generator=g), 1.5 - i / 8),
                }
            )
        )
    for i, slot in enumerate(made):
        multi.install_hooks(slot)
        multi.attach(f"a{i}", slot)
    return made


Samples = list[list[tuple[str, float]]]


def by_hand(
    block: Block, made: list[AdapterSlot], x: torch.Tensor, image: torch.Tensor, samples: Samples
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's output with its own adapters, one row at a time, the plain way."""
    outs, convs = [], []
    for row in range(x.shape[0]):
        out, conv = block.proj(x[row : row + 1]), block.conv(image[row : row + 1])
        for key, scale in samples[row % len(samples)]:
            lora = made[int(key[1:])].modules
            p, c = lora["proj"], lora["conv"]
            out = out + p.scaling * scale * (x[row : row + 1] @ p.a.t() @ p.b.t())
            down = nn.functional.conv2d(image[row : row + 1], c.a, padding=1)
            convs_delta = nn.functional.conv2d(down, c.b)
            conv = conv + c.scaling * scale * convs_delta
        outs.append(out)
        convs.append(conv)
    return torch.cat(outs), torch.cat(convs)


def test_every_row_gets_its_own_adapters_in_one_batch() -> None:
    torch.manual_seed(0)
    block = Block()
    multi = MultiLora(block, torch.device("cpu"), torch.float32)
    made = slots(multi, 3)
    # One adapter, another at another scale, a combination, none; doubled as classifier-free guidance does.
    samples: Samples = [[("a0", 1.0)], [("a1", 0.5)], [("a0", 0.7), ("a2", -0.3)], []]
    x, image = torch.randn(8, 5, IN), torch.randn(8, 3, 6, 6)
    base = block(x, image)
    with torch.inference_mode():
        multi.activate(multi.plan_for(samples))
        got = block(x, image)
        multi.activate(None)
        again = block(x, image)
    want = by_hand(block, made, x, image, samples)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # The row without adapters, and the model once the plan is gone, are the base model's to the bit.
    assert torch.equal(got[0][3], base[0][3]) and torch.equal(got[1][7], base[1][7])
    assert all(torch.equal(a, b) for a, b in zip(again, base, strict=True))


def ops_per_forward(block: Block, multi: MultiLora, samples: Samples, x: torch.Tensor, image: torch.Tensor) -> int:
    with torch.inference_mode():
        multi.activate(multi.plan_for(samples))
        block(x, image)  # the first step makes the batch's stacks; the count is of a step after it
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            block(x, image)
        multi.activate(None)
    return sum(1 for event in prof.events() if event.name.startswith("aten::"))


def test_the_operations_per_step_do_not_grow_with_the_mix() -> None:
    torch.manual_seed(0)
    block = Block()
    multi = MultiLora(block, torch.device("cpu"), torch.float32)
    slots(multi, 8)
    x, image = torch.randn(16, 5, IN), torch.randn(16, 3, 6, 6)
    one = ops_per_forward(block, multi, [[("a0", 1.0)]] * 8, x, image)
    counts = {
        distinct: ops_per_forward(block, multi, [[(f"a{i % distinct}", 1.0)] for i in range(8)], x, image)
        for distinct in (2, 4, 8)
    }
    # Several adapters per sample, at other scales: the same too.
    combos = ops_per_forward(block, multi, [[(f"a{i}", 0.5), (f"a{7 - i}", 1.0)] for i in range(8)], x, image)
    assert counts[2] == counts[4] == counts[8] == combos, counts
    # One adapter for every row takes the plain path: no more work than a mix (a matmul and an addmm).
    assert one <= counts[8] + 10, (one, counts)


@pytest.mark.parametrize("w2", ["factorised", "full", "w1 factorised"])
def test_a_lokr_runs_as_its_kronecker_factors_alone_and_as_its_pair_in_a_mix(w2: str) -> None:
    """kron(w1, w2) x computed from the factors where one LoKr serves the whole batch (far fewer operations than
    its rank-c x r pair), from the exact pair in a mixed batch: both are the formula's delta."""
    g = torch.Generator().manual_seed(3)
    a, c, b, d, r = 4, 3, 5, 8, 2  # a Linear of in = c x d = 24, out = a x b = 20
    tensors = {"lokr_w2_a": torch.randn(b, r, generator=g), "lokr_w2_b": torch.randn(r, d, generator=g)}
    if w2 == "full":
        tensors = {"lokr_w2": torch.randn(b, d, generator=g)}
    tensors |= (
        {"lokr_w1_a": torch.randn(a, 1, generator=g), "lokr_w1_b": torch.randn(1, c, generator=g)}
        if (w2 == "w1 factorised")
        else {"lokr_w1": torch.randn(a, c, generator=g)}
    )
    layer = nn.Linear(c * d, a * b)
    weight = tuple(layer.weight.shape)
    factors = adapter_math.kron_factors(tensors, weight)
    assert factors is not None
    pair = adapter_math.exact_pair("lokr", tensors, weight)
    w1 = tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
    delta = torch.kron(w1, tensors["lokr_w2"] if w2 == "full" else tensors["lokr_w2_a"] @ tensors["lokr_w2_b"])
    multi = MultiLora(layer, torch.device("cpu"), torch.float32)
    lokr = multi.make_slot({"": (*pair, 0.5)}, {"": factors})
    other = multi.make_slot({"": (torch.randn(2, c * d, generator=g), torch.randn(a * b, 2, generator=g), 1.0)})
    assert lokr.modules[""].kron is not None and other.modules[""].kron is None
    for key, slot in (("lokr", lokr), ("other", other)):
        multi.install_hooks(slot)
        multi.attach(key, slot)
    x = torch.randn(6, 7, c * d, generator=g)
    with torch.inference_mode():
        base = layer(x)
        multi.activate(multi.plan_for([[("lokr", 0.8)]]))
        alone = layer(x)
        multi.activate(multi.plan_for([[("lokr", 0.8)], [("other", 1.0)]]))
        mixed = layer(x)
        multi.activate(None)
    want = base + 0.5 * 0.8 * x @ delta.t()
    torch.testing.assert_close(alone, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[0::2], want[0::2], atol=1e-5, rtol=1e-5)
    o = other.modules[""]
    torch.testing.assert_close(mixed[1::2], base[1::2] + x[1::2] @ o.a.t() @ o.b.t(), atol=1e-5, rtol=1e-5)
    # Applied as its factors, a batch all of it costs a few small products, not the pair's rank c x r ones.
    assert lokr.nbytes == sum(t.nbytes for t in (*pair, *(f for f in factors if f is not None)))


def test_a_lokr_whose_pair_is_as_cheap_keeps_only_its_pair() -> None:
    """A w1 of one column (c = 1): the pair's rank is w2's own, and the factors would only add operations."""
    tensors = {"lokr_w1": torch.randn(4, 1), "lokr_w2_a": torch.randn(5, 2), "lokr_w2_b": torch.randn(2, 12)}
    assert adapter_math.kron_factors(tensors, (20, 12)) is None
    assert adapter_math.kron_factors(tensors | {"lokr_w2_b": torch.randn(2, 4, 3, 3)}, (20, 4, 3, 3)) is None
