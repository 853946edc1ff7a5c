"""The adapters of a whole pipeline: one `MultiLora` per part adapters may adapt (the denoiser, each text
encoder), and the model's verdict on an adapter file before its tensors are read.

An adapter attached here may adapt several parts at once (a Kohya file's lora_unet_ and lora_te_ modules);
a plan activates, for every part, the adapters (and scales) each sample runs with. Text encoders run inside
the pipeline call, so a request's prompt, and its negative prompt, are encoded with its own adapters' text
encoder parts while its batch mates' are encoded with theirs.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from omni_grpc.engine import adapter_math
from omni_grpc.engine.adapter_files import AdapterLayout, AdapterWeights
from omni_grpc.engine.adapter_math import DOWN, UP, ModuleFit, NotAPair, Shape
from omni_grpc.engine.file_layouts import ModuleSource
from omni_grpc.engine.kohya_names import KohyaTable, Target
from omni_grpc.engine.lora_layers import AdapterSlot, BatchPlan, MultiLora
from omni_grpc.engine.memo import ModelFacts
from omni_grpc.engine.safetensors_reader import MAX_TENSORS, TENSORS_PER_LAYER
from omni_grpc.errors import FailedPrecondition, InvalidArgument
from omni_grpc.quoting import shown

# Component -> that part's slot of one adapter.
AdapterSlots = dict[str, AdapterSlot]
# transformers names CLIP's modules with or without this (its version decides); files always write it.
_TEXT_MODEL = "text_model."
# Modules (and stackings of them) whose names and shapes one LoraSet remembers: more than any model has layers.
_KNOWN_MODULES = 16384


@dataclass(frozen=True)
class LoraPlan:
    """One pipeline call's per-sample adapters, for each part that any of them adapts."""

    parts: dict[str, BatchPlan]


class LoraSet:
    def __init__(
        self,
        parts: Mapping[str, nn.Module],
        denoiser: str,
        kohya_table: KohyaTable,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        if denoiser not in parts:
            raise ValueError(f"the denoiser {denoiser!r} is not among the parts {sorted(parts)}")
        self._parts = {name: MultiLora(module, device, dtype) for name, module in parts.items()}
        # The layers an adapter can adapt, all parts together: a file for this model has at most
        # TENSORS_PER_LAYER tensors for each.
        layers = sum(isinstance(m, nn.Linear | nn.Conv2d) for part in parts.values() for m in part.modules())
        self.max_tensors = min(MAX_TENSORS, TENSORS_PER_LAYER * layers)
        self._denoiser = denoiser
        self._kohya_table = kohya_table
        self._device = device
        self._dtype = dtype
        # The largest |weight| x scaling the model's dtype computes with: beyond, only overflow.
        self.max_abs_weight = math.sqrt(float(torch.finfo(dtype).max))
        self.host_device = torch.device("cpu")
        # Adapter key -> its slots, for every part it adapts.
        self._slots: dict[str, AdapterSlots] = {}
        # Attaching, moving and planning see an adapter's parts all of one version.
        self._lock = threading.Lock()
        # What the model's modules are never changes: each module's resolved name, and the weight shape each
        # module of a file (one target, or several stacked) has its delta for, once found. Only what resolved is
        # kept, so the model bounds them (and _KNOWN_MODULES does too); read without a lock, as every load of a
        # new layout asks for each of its modules.
        self._names = ModelFacts[tuple[str, str], str](_KNOWN_MODULES)
        self._delta_shapes = ModelFacts[tuple[Target, ...], Shape](_KNOWN_MODULES)

    # ---- the model, as the file layouts see it (file_layouts.Naming) -----------------------------

    @property
    def denoiser(self) -> str:
        return self._denoiser

    @property
    def components(self) -> Collection[str]:
        return tuple(self._parts)

    def kohya_targets(self, names: Collection[str]) -> Mapping[str, tuple[Target, ...]]:
        return self._kohya_table(names)

    def display_name(self, component: str) -> str:
        """How ListAdapters names a part: "denoiser", or the text encoder's component name."""
        return "denoiser" if component == self._denoiser else component

    # ---- the verdict on a layout (any thread) ----------------------------------------------------

    def check_layout(self, layout: AdapterLayout) -> dict[str, ModuleFit]:
        """How each module of the file goes into the model; FailedPrecondition naming the first module (by name)
        that is missing, of a kind LoRA cannot adapt, or of other shapes."""
        try:
            return self._fits(layout, layout.sources)
        except FailedPrecondition:  # judged again in name order, for the refusal that names the first
            self._fits(layout, sorted(layout.sources, key=lambda s: s.name))
            raise

    def _fits(self, layout: AdapterLayout, sources: Iterable[ModuleSource]) -> dict[str, ModuleFit]:
        fits: dict[str, ModuleFit] = {}
        infos = layout.infos
        for source in sources:
            delta, keys = self._delta_shape(layout.path, source), source.keys
            given = None
            if len(keys) == 2 and DOWN in keys and UP in keys:  # (most modules: their own two tensors are the pair)
                given = adapter_math.given_pair(infos[keys[DOWN]].shape, infos[keys[UP]].shape, delta)
            if given is None:
                shapes = {role: infos[key].shape for role, key in keys.items()}
                try:
                    given = adapter_math.pair_shapes(source.algorithm, shapes, delta)
                except NotAPair as exc:
                    raise FailedPrecondition(_misfit(layout.path, source, shapes, delta, str(exc))) from None
            fits[source.name] = ModuleFit(delta, *given)
        return fits

    def _delta_shape(self, path: str, source: ModuleSource) -> Shape:
        """The shape of the weight a module's delta has: its target's, or all its targets' rows stacked."""
        known = self._delta_shapes.get(source.targets)
        if known is None:
            known = self._find_delta_shape(path, source)
            self._delta_shapes.put(source.targets, known)
        return known

    def _find_delta_shape(self, path: str, source: ModuleSource) -> Shape:
        shapes: list[Shape] = []
        for target in source.targets:
            part = self._parts.get(target.component)
            if part is None:
                raise FailedPrecondition(
                    f"adapter {shown(path)} does not fit the base model: module {shown(source.name)} adapts "
                    f"{target.component}, which this model does not have (it has {', '.join(self._parts)})"
                )
            module_name = self._resolve((target.component, target.module))
            module = part.module(module_name) if module_name is not None else None
            if module is None:
                raise FailedPrecondition(
                    f"adapter {shown(path)} does not fit the base model: module {shown(target.module)} does not "
                    f"exist in {part.model_name}" + _from(source, target)
                )
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                raise FailedPrecondition(
                    f"adapter {shown(path)} does not fit the base model: module {shown(target.module)} is a "
                    f"{type(module).__name__}, which LoRA cannot adapt here (Linear and Conv2d only)"
                    + _from(source, target)
                )
            shapes.append(tuple(module.weight.shape))
        first = shapes[0]
        if len(shapes) == 1 and source.targets[0].rows is None:
            return first
        # A fused module: its rows are the targets' rows, in order, and the targets share their input.
        offset = 0
        for target, shape in zip(source.targets, shapes, strict=True):
            rows = target.rows or (0, shape[0])
            if shape[1:] != first[1:] or rows != (offset, offset + shape[0]):
                raise FailedPrecondition(
                    f"adapter {shown(path)} does not fit the base model: module {shown(source.name)} feeds "
                    f"{', '.join(t.module for t in source.targets)}, whose shapes {[list(s) for s in shapes]} do not "
                    "stack into one layer"
                )
            offset += shape[0]
        return (offset, *first[1:])

    def _resolve(self, key: tuple[str, str]) -> str | None:
        """The model's name of a module a file names, (component, module) (None: the model has no such module).
        Asked for every module of every load: the key is the caller's own tuple, not a new one."""
        known = self._names.get(key)
        if known is None:
            known = self._find_name(*key)
            if known is not None:
                self._names.put(key, known)
        return known

    def _find_name(self, component: str, module: str) -> str | None:
        part = self._parts[component]
        if part.module(module) is not None:
            return module
        if module.startswith(_TEXT_MODEL) and part.module(module.removeprefix(_TEXT_MODEL)) is not None:
            return module.removeprefix(_TEXT_MODEL)
        return None

    # ---- slots (any thread) and hooks (worker) ---------------------------------------------------

    def make_slots(self, weights: AdapterWeights) -> AdapterSlots:
        """The adapter's pairs, checked to fit, in the model's dtype on its device, per part."""
        pairs: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
        krons: dict[str, dict[str, adapter_math.Kron]] = {}
        scalings, kron_of = weights.scalings, weights.kron
        for key, (a, b) in weights.modules.items():
            component = key[0]
            name = self._resolve(key)
            assert name is not None  # check_layout judged every target
            part = pairs.get(component)
            if part is None:
                part = pairs[component] = {}
            elif name in part:  # (two names of the file, one module of the model: never half applied)
                raise self._adapted_twice(weights, key, name)
            part[name] = (a, b, scalings[key])
            kron = kron_of.get(key) if kron_of else None
            if kron is not None:
                krons.setdefault(component, {})[name] = kron
        return {
            component: self._parts[component].make_slot(part, krons.get(component)) for component, part in pairs.items()
        }

    def _adapted_twice(self, weights: AdapterWeights, key: tuple[str, str], name: str) -> InvalidArgument:
        component, module = key
        others = (m for c, m in weights.modules if c == component and m != module and self._resolve((c, m)) == name)
        other = next(others)  # (the one already taken: make_slots refuses at the first name taken twice)
        one, two = sorted((other, module))
        return InvalidArgument(
            f"adapter {shown(weights.path)} adapts {component} module {shown(name)} twice, as {shown(one)} and as "
            f"{shown(two)}: this model names its modules without {shown(_TEXT_MODEL)}, so both are that one module"
        )

    def needs_hooks(self, slots: AdapterSlots) -> bool:
        return any(self._parts[component].needs_hooks(slot) for component, slot in slots.items())

    def install_hooks(self, slots: AdapterSlots) -> None:
        """Worker thread only (hooks change modules the model runs)."""
        for component, slot in slots.items():
            self._parts[component].install_hooks(slot)

    def attach(self, key: str, slots: AdapterSlots) -> int:
        """Make the adapter usable in plans; returns the layers it adapts. Replaces a former version whole."""
        with self._lock:
            self._detach_locked(key)
            for component, slot in slots.items():
                self._parts[component].attach(key, slot)
            self._slots[key] = slots
        return sum(len(slot.modules) for slot in slots.values())

    def detach(self, key: str) -> None:
        """Forget the adapter; its tensors are freed with its slots (once no running batch holds them)."""
        with self._lock:
            self._detach_locked(key)

    def _detach_locked(self, key: str) -> None:
        self._slots.pop(key, None)
        for part in self._parts.values():
            part.detach(key)

    @property
    def device(self) -> torch.device:
        return self._device

    def move(self, key: str, device: torch.device) -> None:
        """Move an attached adapter's tensors to another device (a tier move)."""
        with self._lock:
            slots = self._slots.get(key)
            if slots is None:  # detached meanwhile: nothing to move, and nothing to bring back
                return
        pin = device.type == "cpu" and self._device.type == "cuda"  # page-locked: fast copies back to the GPU
        moved = {component: slot.to(device, pin=pin) for component, slot in slots.items()}
        with self._lock:
            if self._slots.get(key) is not slots:  # replaced or detached while the copy ran
                return
            for component, slot in moved.items():
                self._parts[component].attach(key, slot)
            self._slots[key] = moved

    def plan_for(self, samples: Sequence[Sequence[tuple[str, float]]]) -> LoraPlan | None:
        """The plan of these per-sample adapters (by key, each with its scale); None when no sample has one."""
        with self._lock:
            for combo in samples:
                for key, _ in combo:
                    if key not in self._slots:
                        raise RuntimeError(f"adapter {key} is not attached")
            plans = {name: part.plan_for(samples) for name, part in self._parts.items()}
        active = {name: plan for name, plan in plans.items() if plan is not None}
        return LoraPlan(active) if active else None

    def activate(self, plan: LoraPlan | None) -> None:
        """The plan every part's hooks apply from now on (None: the base model). Only the holder of the
        model's turn calls it, before each of its steps runs."""
        for name, part in self._parts.items():
            part.activate(plan.parts.get(name) if plan is not None else None)

    @contextmanager
    def applied(self, samples: Sequence[Sequence[tuple[str, float]]]) -> Iterator[None]:
        """Run the body with these per-sample adapters; the plan never outlives it."""
        self.activate(self.plan_for(samples))
        try:
            yield
        finally:
            self.activate(None)

    def resident_bytes(self) -> int:
        return sum(slot.nbytes for slots in self._slots.values() for slot in slots.values())

    def applied_rank(self, key: str) -> int:
        """The largest rank the hooks run an attached adapter at when a batch is all of it (a LoHa: its exact
        pair's; a LoKr applied as its factors: its w2's)."""
        with self._lock:
            slots = self._slots[key]
        return max(
            m.kron.down.shape[0] if m.kron is not None else m.a.shape[0]
            for slot in slots.values()
            for m in slot.modules.values()
        )


def _from(source: ModuleSource, target: Target) -> str:
    """Where a target came from, when the file names it otherwise."""
    return "" if source.name == target.module else f" (the file's module {shown(source.name)})"


def _misfit(path: str, source: ModuleSource, shapes: Mapping[str, Shape], delta: Shape, why: str) -> str:
    head = f"adapter {shown(path)} does not fit the base model: module {shown(source.name)}"
    down, up = shapes.get("lora_down.weight"), shapes.get("lora_up.weight")
    if source.algorithm == "lora" and down and up and "lora_mid.weight" not in shapes:
        rank, kernel = down[0], delta[2:]
        want_a = [rank, *delta[1:]]
        want_b = [delta[0], rank, *((1,) * len(kernel))]
        return f"{head} expects lora_A {want_a} and lora_B {want_b}, the adapter has {list(down)} and {list(up)}"
    return f"{head} ({source.algorithm}) {why}"
