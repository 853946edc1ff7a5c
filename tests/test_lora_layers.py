"""Per-sample LoRA on one model part (engine/lora_layers.py), on plain torch modules: every row gets its own
adapters' delta, and the work per adapted layer does not grow with the mix of adapters in the batch."""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

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
