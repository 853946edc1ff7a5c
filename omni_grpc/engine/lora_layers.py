"""Apply many LoRA adapters to one denoiser, per sample, without changing its weights.

Each Linear/Conv2d that some adapter targets gets one forward hook, installed the first time an adapter
names it. Before each of its steps a batch activates its `BatchPlan`: the adapter and scale of every sample.
The hook adds `lora_B(lora_A(x)) * scaling * scale` for each group of samples that share an adapter and a
scale; samples without an adapter are left alone. With no plan the hooks return the base output untouched,
so base results stay bit-identical to a model that never saw an adapter.

Adapter tensors live in `AdapterSlot`s, outside the module tree: moving one between memory tiers is a
tensor copy, switching adapters is setting a plan, and neither depends on how many adapters are loaded.

Threads: `activate` and `install_hooks` run only with the model's turn (see `turns`: hooks change modules
the model runs). Registering, replacing and dropping a slot is one dict operation, safe from any thread: a
running batch holds the slots it uses, and the adapter table never drops or moves an adapter a request holds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omni_grpc.engine.adapter_files import AdapterLayout, AdapterWeights
from omni_grpc.errors import FailedPrecondition
from omni_grpc.quoting import shown

log = logging.getLogger(__name__)


@dataclass
class ModuleLora:
    """One adapted module of one adapter."""

    a: torch.Tensor
    b: torch.Tensor
    # alpha / r (or alpha / sqrt(r) with rsLoRA), as peft computes it for this module.
    scaling: float
    # Conv2d geometry of lora_A (it convolves like the base layer); None for Linear.
    conv: tuple[Any, Any, Any] | None = None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.linear(F.linear(x, self.a), self.b)
        stride, padding, dilation = self.conv
        return F.conv2d(F.conv2d(x, self.a, None, stride, padding, dilation), self.b)

    def add_to(self, output: torch.Tensor, x: torch.Tensor, factor: float, index: torch.Tensor | None) -> torch.Tensor:
        """output (+)= factor * lora_B(lora_A(x)) on the rows in `index` (all rows when None).

        The base layer's output is a fresh tensor that nothing else holds yet, so it is updated in
        place: for a Linear the up-projection accumulates straight into it (one GEMM, no temporaries
        of the output's size), which keeps an adapted step within a few percent of a base step.
        """
        if index is not None:
            return output.index_add_(0, index, self.delta(x.index_select(0, index)).to(output.dtype), alpha=factor)
        if self.conv is None and output.is_contiguous():
            down = F.linear(x, self.a)
            output.view(-1, output.shape[-1]).addmm_(down.reshape(-1, down.shape[-1]), self.b.t(), alpha=factor)
            return output
        return output.add_(self.delta(x).to(output.dtype), alpha=factor)

    def to(self, device: torch.device, *, pin: bool = False) -> ModuleLora:
        a, b = self.a.to(device), self.b.to(device)
        if pin:
            a, b = a.pin_memory(), b.pin_memory()
        return ModuleLora(a, b, self.scaling, self.conv)


@dataclass
class AdapterSlot:
    """An adapter's tensors, ready for the hooks, on one device."""

    modules: dict[str, ModuleLora]
    device: torch.device

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())

    def to(self, device: torch.device, *, pin: bool = False) -> AdapterSlot:
        """The slot on `device`; `pin` page-locks host memory so the copy back to a GPU is fast."""
        if device == self.device:
            return self
        return AdapterSlot({name: m.to(device, pin=pin) for name, m in self.modules.items()}, device)


@dataclass
class BatchPlan:
    """The adapter slot (or None) and scale of each sample of one pipeline call.

    The plan holds the slots themselves, so an adapter unloaded or moved while the call runs stays
    intact for that call.
    """

    samples: Sequence[tuple[AdapterSlot | None, float]]
    _groups: dict[tuple[int, torch.device], list[tuple[AdapterSlot, float, torch.Tensor | None]]] = field(
        default_factory=dict
    )

    @property
    def has_adapters(self) -> bool:
        return any(slot is not None for slot, _ in self.samples)

    def groups(self, batch: int, device: torch.device) -> list[tuple[AdapterSlot, float, torch.Tensor | None]]:
        """(slot, scale, row index or None for "all rows") for a denoiser batch of `batch` rows.

        Classifier-free guidance runs the denoiser on [uncond; cond], i.e. the samples repeated, so row
        j belongs to sample j % len(samples).
        """
        cached = self._groups.get((batch, device))
        if cached is not None:
            return cached
        n = len(self.samples)
        if batch % n:
            raise RuntimeError(f"denoiser batch {batch} is not a multiple of the {n} planned samples")
        rows: dict[tuple[int, float], tuple[AdapterSlot, list[int]]] = {}
        for row in range(batch):
            slot, scale = self.samples[row % n]
            if slot is not None:
                rows.setdefault((id(slot), scale), (slot, []))[1].append(row)
        groups = [
            (slot, scale, None if len(idx) == batch else torch.tensor(idx, device=device))
            for (_, scale), (slot, idx) in rows.items()
        ]
        self._groups[(batch, device)] = groups
        return groups


class MultiLora:
    """The adapters attached to one denoiser, by internal (per-load unique) key."""

    def __init__(self, denoiser: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self._denoiser = denoiser
        self._device = device
        # The host tier; on a CPU-only machine it is the same memory as the device tier.
        self.host_device = torch.device("cpu")
        self._dtype = dtype
        # Adapters never change the module tree, so one name -> module map serves every lookup.
        self._modules = dict(denoiser.named_modules())
        self._slots: dict[str, AdapterSlot] = {}
        self._hooked: set[str] = set()
        self._plan: BatchPlan | None = None

    # ---- reading (any thread) -------------------------------------------------------------------

    @property
    def max_abs_weight(self) -> float:
        """The largest |weight| x scaling this denoiser's dtype computes with: beyond, only overflow."""
        return math.sqrt(float(torch.finfo(self._dtype).max))

    def max_adapter_bytes(self, max_rank: int) -> int:
        """The most bytes an adapter of rank `max_rank` can hold on this denoiser (every layer adapted, F32)."""
        total = 0
        for module in self._modules.values():
            shapes = _expected_shapes(module, max_rank)
            if shapes is not None:
                total += 4 * sum(math.prod(shape) for shape in shapes)
        return total

    def check_fits(self, layout: AdapterLayout) -> None:
        """Raise FailedPrecondition naming the first module that is missing or has other shapes."""
        self._check_shapes({name: (a.shape, b.shape) for name, (a, b) in layout.modules.items()}, layout.path)

    def make_slot(self, weights: AdapterWeights) -> AdapterSlot:
        """The adapter's tensors in the model's dtype on the model's device."""
        self._check_shapes({name: (a.shape, b.shape) for name, (a, b) in weights.modules.items()}, weights.path)
        target = self._device
        modules: dict[str, ModuleLora] = {}
        for name, (a, b) in weights.modules.items():
            base = self._modules[name]
            conv = (base.stride, base.padding, base.dilation) if isinstance(base, nn.Conv2d) else None
            modules[name] = ModuleLora(
                a=a.to(device=target, dtype=self._dtype),
                b=b.to(device=target, dtype=self._dtype),
                scaling=weights.scalings[name],
                conv=conv,
            )
        return AdapterSlot(modules, target)

    def _check_shapes(self, shapes: dict[str, tuple[Sequence[int], Sequence[int]]], path: str) -> None:
        model_name = type(self._denoiser).__name__
        for module_name in sorted(shapes):
            a, b = (tuple(shape) for shape in shapes[module_name])
            module = self._modules.get(module_name)
            if module is None:
                raise FailedPrecondition(
                    f"adapter {shown(path)} does not fit the base model: module {shown(module_name)} does not "
                    f"exist in {model_name}"
                )
            expected = _expected_shapes(module, a[0])
            if expected is None:
                raise FailedPrecondition(
                    f"adapter {shown(path)} does not fit the base model: module {shown(module_name)} is a "
                    f"{type(module).__name__}, which LoRA cannot adapt here (Linear and Conv2d only)"
                )
            if (a, b) != expected:
                raise FailedPrecondition(
                    f"adapter {shown(path)} does not fit the base model: module {shown(module_name)} "
                    f"expects lora_A {list(expected[0])} and lora_B {list(expected[1])}, the adapter has "
                    f"{list(a)} and {list(b)}"
                )

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

    @property
    def device(self) -> torch.device:
        return self._device

    def move(self, key: str, device: torch.device) -> None:
        """Move an attached adapter's tensors to another device (a tier move)."""
        current = self._slots.get(key)
        if current is None:  # detached meanwhile: nothing to move, and nothing to bring back
            return
        self._slots[key] = current.to(device, pin=device.type == "cpu" and self._device.type == "cuda")

    def plan_for(self, samples: Sequence[tuple[str | None, float]]) -> BatchPlan | None:
        """The BatchPlan of these per-sample adapters (by key); None when no sample has one."""
        slots = {key: self._slots[key] for key, _ in samples if key is not None}
        for key, slot in slots.items():
            if slot.device != self._device:
                raise RuntimeError(f"adapter {key} is on {slot.device}, not {self._device}; promote it first")
        plan = BatchPlan([(slots[key] if key is not None else None, scale) for key, scale in samples])
        return plan if plan.has_adapters else None

    def activate(self, plan: BatchPlan | None) -> None:
        """The plan the hooks apply from now on (None: the base model). Only the holder of the model's turn
        calls it, before each of its steps run: batches in flight take turns."""
        self._plan = plan

    @contextmanager
    def applied(self, samples: Sequence[tuple[str | None, float]]) -> Iterator[None]:
        """Run the body with these per-sample adapters (by key); the plan never outlives it."""
        self.activate(self.plan_for(samples))
        try:
            yield
        finally:
            self.activate(None)

    # ---- introspection ----------------------------------------------------------------------------

    def resident_bytes(self) -> int:
        return sum(slot.nbytes for slot in self._slots.values())

    def _hook_for(self, name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            plan = self._plan
            if plan is None:
                return None
            x = args[0]
            for slot, scale, index in plan.groups(x.shape[0], x.device):
                lora = slot.modules.get(name)
                if lora is not None:
                    output = lora.add_to(output, x, lora.scaling * scale, index)
            return output

        return hook


def _expected_shapes(module: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    if isinstance(module, nn.Linear):
        return (rank, module.in_features), (module.out_features, rank)
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return (rank, module.in_channels, kh, kw), (module.out_channels, rank, 1, 1)
    return None
