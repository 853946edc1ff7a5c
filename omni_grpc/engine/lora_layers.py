"""Attach, detach and activate LoRA adapters on the denoiser (peft layers through diffusers' loader).

Only the engine's worker thread calls attach/detach/activate: it is the one owner of the pipeline.
`check_fits` only reads module shapes and may run on any thread.

Invariant between requests: no LoRA layer has an active adapter, so a request without an adapter runs
the base weights exactly. A request activates one adapter on that adapter's own layers (touching neither
other adapters nor their layers, so the cost does not grow with the number loaded) and sets its scale on
those layers for that request only.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from omni_grpc.engine.lora_io import AdapterWeights
from omni_grpc.errors import FailedPrecondition

log = logging.getLogger(__name__)
# peft warns at every second adapter in one model; many adapters side by side is the point here.
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")


@dataclass
class _Attached:
    layers: list[BaseTunerLayer]
    # peft's alpha / r (or alpha / sqrt(r)) per layer, captured at attach time; a request multiplies it.
    base_scaling: list[float]


class LoraLayers:
    """The adapters attached to one denoiser, by internal (per-load unique) peft adapter name."""

    def __init__(self, denoiser: nn.Module) -> None:
        self._denoiser = denoiser
        self._attached: dict[str, _Attached] = {}

    def check_fits(self, weights: AdapterWeights) -> None:
        """Raise FailedPrecondition naming the first module that is missing or has other shapes."""
        model_name = type(self._denoiser).__name__
        for module_name in sorted(weights.modules):
            a, b = weights.modules[module_name]
            try:
                module = self._denoiser.get_submodule(module_name)
            except AttributeError:
                raise FailedPrecondition(
                    f"adapter '{weights.path}' does not fit the base model: module '{module_name}' does not "
                    f"exist in {model_name}"
                ) from None
            if isinstance(module, BaseTunerLayer):
                module = module.get_base_layer()
            expected = _expected_shapes(module, a.shape[0])
            if expected is None:
                raise FailedPrecondition(
                    f"adapter '{weights.path}' does not fit the base model: module '{module_name}' is a "
                    f"{type(module).__name__}, which LoRA cannot adapt here (Linear and Conv2d only)"
                )
            if (tuple(a.shape), tuple(b.shape)) != expected:
                raise FailedPrecondition(
                    f"adapter '{weights.path}' does not fit the base model: module '{module_name}' "
                    f"expects lora_A {list(expected[0])} and lora_B {list(expected[1])}, the adapter has "
                    f"{list(a.shape)} and {list(b.shape)}"
                )

    def attach(self, internal_name: str, weights: AdapterWeights) -> int:
        """Inject the adapter's layers; returns how many layers it adapts. Worker thread only."""
        self.check_fits(weights)
        try:
            # Passing the config as metadata makes diffusers honour lora_alpha (it assumes alpha == r
            # otherwise) and reproduces peft's own output exactly.
            self._denoiser.load_lora_adapter(
                weights.state_dict(), prefix=None, adapter_name=internal_name, metadata=dict(weights.lora_config)
            )
        except (ValueError, RuntimeError, TypeError, KeyError) as exc:
            self._forget(internal_name)
            raise FailedPrecondition(f"adapter '{weights.path}' could not be attached: {exc}") from exc
        layers = [m for m in self._denoiser.modules() if isinstance(m, BaseTunerLayer) and internal_name in m.lora_A]
        if len(layers) != len(weights.modules):
            # diffusers only logs a warning when keys match nothing; here that is an error.
            self._forget(internal_name)
            raise FailedPrecondition(
                f"adapter '{weights.path}' adapted {len(layers)} of its {len(weights.modules)} layers; "
                "refusing to serve a partially applied adapter"
            )
        self._attached[internal_name] = _Attached(layers, [float(m.scaling[internal_name]) for m in layers])
        self._deactivate_all()
        return len(layers)

    def detach(self, internal_name: str) -> None:
        """Remove the adapter's layers and free its tensors. Worker thread only."""
        self._attached.pop(internal_name, None)
        self._forget(internal_name)

    @contextmanager
    def active(self, internal_name: str | None, scale: float) -> Iterator[None]:
        """Run the body with exactly this adapter at this scale (or none). Worker thread only."""
        if internal_name is None:
            yield
            return
        attached = self._attached[internal_name]
        for layer, base in zip(attached.layers, attached.base_scaling, strict=True):
            layer.scaling[internal_name] = base * scale
            layer._active_adapter = [internal_name]  # noqa: SLF001 - set_adapter() walks every adapter
        try:
            yield
        finally:
            for layer, base in zip(attached.layers, attached.base_scaling, strict=True):
                layer._active_adapter = []  # noqa: SLF001
                layer.scaling[internal_name] = base

    def _forget(self, internal_name: str) -> None:
        if internal_name in getattr(self._denoiser, "peft_config", {}):
            self._denoiser.delete_adapters(internal_name)
        # peft re-activates some remaining adapter after a delete; restore the invariant.
        self._deactivate_all()

    def _deactivate_all(self) -> None:
        for module in self._denoiser.modules():
            if isinstance(module, BaseTunerLayer):
                module._active_adapter = []  # noqa: SLF001

    @property
    def attached(self) -> list[str]:
        return list(self._attached)


def _expected_shapes(module: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    if isinstance(module, nn.Linear):
        return (rank, module.in_features), (module.out_features, rank)
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return (rank, module.in_channels, kh, kw), (module.out_channels, rank, 1, 1)
    return None


def lora_parameter_count(denoiser: nn.Module) -> int:
    """Number of LoRA parameters held by the denoiser (for tests and memory accounting)."""
    return sum(p.numel() for name, p in denoiser.named_parameters() if "lora_" in name) + sum(
        b.numel() for name, b in denoiser.named_buffers() if "lora_" in name
    )


__all__ = ["LoraLayers", "lora_parameter_count"]
