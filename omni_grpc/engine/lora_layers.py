"""Apply many LoRA adapters to one model part (a denoiser, a text encoder), per sample, without changing its
weights.

Each Linear/Conv2d that some adapter targets gets one forward hook, installed the first time an adapter
names it. Before each of its steps a batch activates its `BatchPlan`: the adapters and scales of every
sample (none, one or several). A sample's adapters add up as diffusers' `set_adapters` composes them, and
samples without an adapter are left alone. The hook's work does not grow with the mix of adapters:

- every row runs with the same adapter at the same scale: `lora_B(lora_A(x))` accumulates into the output
  (a matmul and an addmm); a LoKr of a Linear runs as its Kronecker factors (`KronFactors`: three small
  products), not as its exact pair, whose rank is its w2's times its w1's width;
- any other mix (several adapters, scales, combinations, rows without one): each row's adapters are
  stacked once per batch into one rank-padded pair, their ranks concatenated and their scales folded into
  B (`LoraStack`), and every step applies all rows with one batched matmul down and one batched
  matmul-add up (grouped convolutions for a Conv2d), as Punica's and S-LoRA's batched kernels do for LLMs.

With no plan the hooks return the base output untouched, so base results stay bit-identical to a model
that never saw an adapter.

Adapter tensors live in `AdapterSlot`s, outside the module tree: moving one between memory tiers is a
tensor copy, switching adapters is setting a plan, and neither depends on how many adapters are loaded.

Threads: `activate` and `install_hooks` run only with the model's turn (see `turns`: hooks change modules
the model runs). Registering, replacing and dropping a slot is one dict operation, safe from any thread: a
running batch holds the slots it uses, and the adapter table never drops or moves an adapter a request holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec
import torch
import torch.nn.functional as F
from torch import nn

from omni_grpc.engine.adapter_math import Kron

# A Conv2d's (stride, padding, dilation): how its lora_A convolves.
Conv = tuple[Any, Any, Any]


class KronFactors(NamedTuple):
    """A LoKr delta of a Linear, kron(w1, w2) with w2 = up @ down (or w2 = down): applied to each row's input X
    viewed as (c, d), as w1 X w2^T, it costs about what a LoRA of w2's rank does, where its exact pair's rank is
    c times that (LyCORIS' usual factor makes it the layer's own width)."""

    w1: torch.Tensor  # (a, c)
    down: torch.Tensor  # (r, d)
    up: torch.Tensor | None  # (b, r); None: r is b

    def add_to(self, output: torch.Tensor, x: torch.Tensor, factor: float) -> torch.Tensor:
        """output += factor * kron(w1, w2) x on every row (output contiguous)."""
        a, c = self.w1.shape
        d = self.down.shape[1]
        rows = x.numel() // (c * d)
        mixed = torch.matmul(self.w1, F.linear(x.reshape(rows * c, d), self.down).view(rows, c, -1))  # (rows, a, r)
        if self.up is None:
            output.view(rows, -1).add_(mixed.view(rows, -1), alpha=factor)
        else:
            output.view(rows * a, -1).addmm_(mixed.view(rows * a, -1), self.up.t(), alpha=factor)
        return output

    def to(self, device: torch.device, *, pin: bool = False) -> KronFactors:
        moved = [t.to(device) if t is not None else None for t in self]
        if pin:
            moved = [t.pin_memory() if t is not None else None for t in moved]
        return KronFactors(*moved)  # type: ignore[arg-type]  # w1 and down are never None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self if t is not None)


class ModuleLora(msgspec.Struct, gc=False):
    """One adapted module of one adapter. A struct the garbage collector does not track (it holds tensors and
    numbers, never a cycle): a load makes one per module, and every tracked object a load keeps brings the next
    collection nearer, within some load."""

    a: torch.Tensor
    b: torch.Tensor
    # alpha / r (or alpha / sqrt(r) with rsLoRA), as peft computes it for this module.
    scaling: float
    # Conv2d geometry of lora_A (it convolves like the base layer); None for Linear.
    conv: Conv | None = None
    # A LoKr's factors, where applying them beats its exact pair (a, b): what a batch all of it runs with uses.
    kron: KronFactors | None = None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.linear(F.linear(x, self.a), self.b)
        stride, padding, dilation = self.conv
        return F.conv2d(F.conv2d(x, self.a, None, stride, padding, dilation), self.b)

    def add_to(self, output: torch.Tensor, x: torch.Tensor, factor: float) -> torch.Tensor:
        """output += factor * lora_B(lora_A(x)), on every row.

        The base layer's output is a fresh tensor that nothing else holds yet, so it is updated in
        place: for a Linear the up-projection accumulates straight into it (one GEMM, no temporaries
        of the output's size), which keeps an adapted step within a few percent of a base step.
        """
        if self.kron is not None and output.is_contiguous():
            return self.kron.add_to(output, x, factor)
        if self.conv is None and output.is_contiguous():
            down = F.linear(x, self.a)
            output.view(-1, output.shape[-1]).addmm_(down.reshape(-1, down.shape[-1]), self.b.t(), alpha=factor)
            return output
        return output.add_(self.delta(x).to(output.dtype), alpha=factor)

    def to(self, device: torch.device, *, pin: bool = False) -> ModuleLora:
        a, b = self.a.to(device), self.b.to(device)
        if pin:
            a, b = a.pin_memory(), b.pin_memory()
        kron = self.kron.to(device, pin=pin) if self.kron is not None else None
        return ModuleLora(a, b, self.scaling, self.conv, kron)

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes + (self.kron.nbytes if self.kron is not None else 0)


@dataclass
class AdapterSlot:
    """An adapter's tensors, ready for the hooks, on one device."""

    modules: dict[str, ModuleLora]
    device: torch.device

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.modules.values())

    def to(self, device: torch.device, *, pin: bool = False) -> AdapterSlot:
        """The slot on `device`; `pin` page-locks host memory so the copy back to a GPU is fast."""
        if device == self.device:
            return self
        return AdapterSlot({name: m.to(device, pin=pin) for name, m in self.modules.items()}, device)


@dataclass
class LoraStack:
    """The adapters of every row of a batch at one module, as one rank-padded pair: row i's adapters'
    ranks side by side (zeros beyond), their factor (scaling x scale) folded into B."""

    # Linear: A^T (rows, in, R), B^T (rows, R, out). Conv2d: A (rows x R, in, kh, kw), B (rows x out, R, 1, 1).
    a: torch.Tensor
    b: torch.Tensor
    conv: Conv | None

    @classmethod
    def of(cls, rows: Sequence[Sequence[tuple[ModuleLora, float]]]) -> LoraStack:
        first = next(lora for row in rows for lora, _ in row)
        rank = max(sum(lora.a.shape[0] for lora, _ in row) for row in rows)
        a = first.a.new_zeros((len(rows), rank, *first.a.shape[1:]))
        b = first.b.new_zeros((len(rows), first.b.shape[0], rank))
        for i, row in enumerate(rows):
            start = 0
            for lora, factor in row:
                r = lora.a.shape[0]
                a[i, start : start + r] = lora.a
                b[i, :, start : start + r] = lora.b.flatten(1) * (lora.scaling * factor)
                start += r
        if first.conv is None:
            return cls(a.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous(), None)
        return cls(a.flatten(0, 1), b.flatten(0, 1)[..., None, None], first.conv)

    def add_to(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """output += each row's lora_B(lora_A(x_row)): the same few operations whatever the rows run with."""
        rows = x.shape[0]
        if self.conv is None:
            down = torch.bmm(x.reshape(rows, -1, x.shape[-1]), self.a)
            if output.is_contiguous():
                output.view(rows, -1, output.shape[-1]).baddbmm_(down, self.b)
                return output
            return output.add_(torch.bmm(down, self.b).view(output.shape))
        stride, padding, dilation = self.conv
        down = F.conv2d(x.reshape(1, -1, *x.shape[2:]), self.a, None, stride, padding, dilation, groups=rows)
        up = F.conv2d(down, self.b, groups=rows)
        return output.add_(up.view(output.shape))


@dataclass
class BatchPlan:
    """The adapters, each with its scale, of every sample of one pipeline call (none, one or several).

    The plan holds the slots themselves, so an adapter unloaded or moved while the call runs stays
    intact for that call.
    """

    samples: Sequence[Sequence[tuple[AdapterSlot, float]]]
    # Per module name and batch size: the one (lora, scale) every row runs with, else the rows' stack; None
    # where no row's adapters adapt that module.
    _deltas: dict[tuple[str, int], tuple[ModuleLora, float] | LoraStack | None] = field(default_factory=dict)

    @property
    def has_adapters(self) -> bool:
        return any(self.samples)

    @property
    def uniform(self) -> bool:
        """Every sample runs with the same one adapter at the same scale."""
        first = self.samples[0]
        return len(first) == 1 and all(
            len(combo) == 1 and combo[0][0] is first[0][0] and combo[0][1] == first[0][1] for combo in self.samples
        )

    def for_module(self, name: str, batch: int) -> tuple[ModuleLora, float] | LoraStack | None:
        """What module `name` adds for a batch of `batch` rows, made at its first step and kept for the others.

        Classifier-free guidance runs the denoiser on [uncond; cond], i.e. the samples repeated, and text
        encoders run on the prompts, then on the negative prompts: so row j belongs to sample j % len(samples).
        """
        key = (name, batch)
        if key not in self._deltas:
            self._deltas[key] = self._make_delta(name, batch)
        return self._deltas[key]

    def _make_delta(self, name: str, batch: int) -> tuple[ModuleLora, float] | LoraStack | None:
        n = len(self.samples)
        if batch % n:
            raise RuntimeError(f"batch of {batch} rows is not a multiple of the {n} planned samples")
        per_sample = [
            [(lora, scale) for slot, scale in combo if (lora := slot.modules.get(name)) is not None]
            for combo in self.samples
        ]
        if not any(per_sample):
            return None
        if self.uniform:
            return per_sample[0][0]
        return LoraStack.of([per_sample[row % n] for row in range(batch)])


def _conv_geometry(module: nn.Module) -> Conv | None:
    """How a Conv2d convolves (its lora_A convolves alike); None for a Linear."""
    return (module.stride, module.padding, module.dilation) if isinstance(module, nn.Conv2d) else None


class MultiLora:
    """The adapters attached to one module tree (a denoiser, a text encoder), by internal (per-load unique)
    key."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self._device = device
        self._on_cpu = device.type == "cpu"  # (asked of every tensor placed: cheaper than comparing devices)
        # The host tier; on a CPU-only machine it is the same memory as the device tier.
        self.host_device = torch.device("cpu")
        self._dtype = dtype
        self.model_name = type(model).__name__
        # Adapters never change the module tree, so one name -> module map serves every lookup.
        self._modules = dict(model.named_modules())
        self._slots: dict[str, AdapterSlot] = {}
        self._hooked: set[str] = set()
        self._plan: BatchPlan | None = None
        # Each adapted module's Conv2d geometry (None: a Linear), once asked: asked for every module of every load.
        self._convs: dict[str, Conv | None] = {}

    # ---- reading (any thread) -------------------------------------------------------------------

    def module(self, name: str) -> nn.Module | None:
        return self._modules.get(name)

    def make_slot(
        self,
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
        krons: Mapping[str, Kron] | None = None,
    ) -> AdapterSlot:
        """Module -> (A, B, scaling), checked to fit, as tensors in the model's dtype on the model's device; and
        for LoKr modules of Linear layers their factors (w1, down, up), applied in their place where they can."""
        modules: dict[str, ModuleLora] = {}
        placed, convs = self._placed, self._convs
        for name, (a, b, scaling) in pairs.items():
            try:
                conv = convs[name]
            except KeyError:
                conv = convs[name] = _conv_geometry(self._modules[name])
            factors = krons.get(name) if krons else None
            kron = None
            if factors is not None and conv is None:
                w1, down, up = factors
                kron = KronFactors(placed(w1), placed(down), placed(up) if up is not None else None)
            modules[name] = ModuleLora(placed(a), placed(b), scaling, conv, kron)
        return AdapterSlot(modules, self._device)

    def _placed(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor in the model's dtype on its device (itself when it is already: no call per tensor)."""
        if tensor.dtype is self._dtype and (tensor.is_cpu if self._on_cpu else tensor.device == self._device):
            return tensor
        return tensor.to(device=self._device, dtype=self._dtype)

    # ---- hooks and plans: worker thread; slots: any thread (see the module docstring) -----------

    def needs_hooks(self, slot: AdapterSlot) -> bool:
        """True if the slot adapts a module that has no hook yet (then `install_hooks` on the worker)."""
        return not self._hooked.issuperset(slot.modules)

    def install_hooks(self, slot: AdapterSlot) -> None:
        """Hook the slot's modules that have no hook yet. Worker thread only."""
        for name in slot.modules:
            if name not in self._hooked:
                self._modules[name].register_forward_hook(self._hook_for(name))
                self._hooked.add(name)

    def attach(self, key: str, slot: AdapterSlot) -> int:
        """Make the adapter usable in plans (its hooks must be installed); returns the layers it adapts."""
        if self.needs_hooks(slot):
            raise RuntimeError("install_hooks() before attach()")
        self._slots[key] = slot
        return len(slot.modules)

    def detach(self, key: str) -> None:
        """Forget the adapter; its tensors are freed with the slot (once no running batch holds it)."""
        self._slots.pop(key, None)

    def slot(self, key: str) -> AdapterSlot:
        return self._slots[key]

    @property
    def device(self) -> torch.device:
        return self._device

    def plan_for(self, samples: Sequence[Sequence[tuple[str, float]]]) -> BatchPlan | None:
        """The BatchPlan of these per-sample adapters (by key; keys attached to another part are skipped);
        None when no sample has one here."""
        slots = self._slots
        plan = BatchPlan([[(slots[key], scale) for key, scale in combo if key in slots] for combo in samples])
        for combo in plan.samples:
            for slot, _ in combo:
                if slot.device != self._device:
                    raise RuntimeError(f"an adapter is on {slot.device}, not {self._device}; promote it first")
        return plan if plan.has_adapters else None

    def activate(self, plan: BatchPlan | None) -> None:
        """The plan the hooks apply from now on (None: the base model). Only the holder of the model's turn
        calls it, before each of its steps run: batches in flight take turns."""
        self._plan = plan

    # ---- introspection ----------------------------------------------------------------------------

    def resident_bytes(self) -> int:
        return sum(slot.nbytes for slot in self._slots.values())

    def _hook_for(self, name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            plan = self._plan
            if plan is None:
                return None
            x = args[0]
            delta = plan.for_module(name, x.shape[0])
            if delta is None:
                return None
            if isinstance(delta, LoraStack):
                return delta.add_to(output, x)
            lora, scale = delta
            return lora.add_to(output, x, lora.scaling * scale)

        return hook
