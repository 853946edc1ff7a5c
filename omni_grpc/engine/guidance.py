"""Per-sample guidance inside one pipeline call, for each way a family guides.

A pipeline call has one `guidance_scale`; these hooks let each sample of the batch have its own. Each has
`set(scales, used)` (per-sample scales, for a call made with `used`) and `clear()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn


class SampleGuidance(Protocol):
    def set(self, scales: list[float], used: float) -> None: ...

    def clear(self) -> None: ...


class NoGuidance:
    """A family without a guidance input (Flux schnell): nothing to set."""

    def set(self, scales: list[float], used: float) -> None:
        return None

    def clear(self) -> None:
        return None


class BatchedCFG:
    """Classifier-free guidance on a doubled batch [uncond; cond] in one denoiser call (SD, SDXL, SD3).

    The pipelines combine the unconditional and conditional predictions as u + G * (t - u) with one G.
    Rewriting the conditional half to u + (g_i / G) * (t - u) before that makes it u + g_i * (t - u) for
    sample i. Samples whose g_i equals G are left untouched, so a batch of equal scales is exact.
    """

    def __init__(self, denoiser: nn.Module) -> None:
        self._ratios: torch.Tensor | None = None
        denoiser.register_forward_hook(self._hook)

    def set(self, scales: list[float], used: float) -> None:
        if used <= 1:  # guidance off for the whole call: the batch is not doubled
            self._ratios = None
            return
        ratios = [g / used for g in scales]
        self._ratios = None if all(r == 1.0 for r in ratios) else torch.tensor(ratios, dtype=torch.float64)

    def clear(self) -> None:
        self._ratios = None

    def _hook(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        ratios = self._ratios
        if ratios is None:
            return None
        pred = output[0] if isinstance(output, tuple) else output.sample
        n = ratios.shape[0]
        if pred.shape[0] != 2 * n:
            raise RuntimeError(f"expected a guided batch of {2 * n} rows, got {pred.shape[0]}")
        uncond, cond = pred[:n], pred[n:]
        shape = (n,) + (1,) * (pred.ndim - 1)
        r = ratios.to(device=pred.device, dtype=pred.dtype).view(shape)
        rewritten = torch.where(r == 1.0, cond, uncond + r * (cond - uncond))
        new = torch.cat([uncond, rewritten])
        if isinstance(output, tuple):
            return (new, *output[1:])
        output.sample = new
        return output


class DistilledGuidance:
    """Guidance distilled into the denoiser as an input (Flux dev): the pipeline passes `guidance` of shape
    [B] filled with one scale; a pre-hook gives each row its own sample's scale. Exact, since it is an input
    of the model and not a combination of outputs."""

    def __init__(self, denoiser: nn.Module) -> None:
        self._scales: torch.Tensor | None = None
        denoiser.register_forward_pre_hook(self._hook, with_kwargs=True)

    def set(self, scales: list[float], used: float) -> None:
        self._scales = None if all(g == used for g in scales) else torch.tensor(scales, dtype=torch.float32)

    def clear(self) -> None:
        self._scales = None

    def _hook(self, _module: nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
        scales, given = self._scales, kwargs.get("guidance")
        if scales is None or given is None:
            return None
        if given.shape[0] != scales.shape[0]:
            raise RuntimeError(f"guidance for {given.shape[0]} rows, {scales.shape[0]} samples planned")
        kwargs["guidance"] = scales.to(device=given.device, dtype=given.dtype)
        return args, kwargs


class TwoPassCFG:
    """True classifier-free guidance as two denoiser calls per step (Qwen-Image; Wan): the pipeline runs the
    batch inside `cache_context("cond")`, then `cache_context("uncond")`, and combines u + G (c - u) (Qwen then
    rescales by |c| / |pred| per token). Rewriting each sample's uncond output to
    u' = (u (1 - g) + c (g - G)) / (1 - G) makes that u + g (c - u) for sample i, so the rescale sees the
    sample's own combination too. Samples with g == G are left alone. Needs G != 1 (guidance on)."""

    def __init__(self, *denoisers: nn.Module) -> None:
        self._ratios: list[float] | None = None
        self._used = 0.0
        self._context: str | None = None
        self._cond: torch.Tensor | None = None
        for denoiser in denoisers:
            self._follow_context(denoiser)
            denoiser.register_forward_hook(self._hook)

    def _follow_context(self, denoiser: nn.Module) -> None:
        # Which pass a call is, from the pipeline's own cache_context around it (an instance attribute that
        # shadows the method).
        original: Any = getattr(denoiser, "cache_context")  # noqa: B009 - diffusers' CacheMixin method, untyped
        outer = self

        @contextlib.contextmanager
        def cache_context(name: str, *args: Any, **kwargs: Any) -> Iterator[None]:
            outer._context = name
            try:
                with original(name, *args, **kwargs):
                    yield
            finally:
                outer._context = None

        denoiser.__dict__["cache_context"] = cache_context  # found before the class's method

    def set(self, scales: list[float], used: float) -> None:
        self._cond = None
        self._ratios = None if used <= 1 or all(g == used for g in scales) else list(scales)
        self._used = used

    def clear(self) -> None:
        self._ratios = None
        self._cond = None

    def _hook(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        if self._ratios is None:
            return None
        pred = output[0] if isinstance(output, tuple) else output.sample
        if self._context == "cond":
            self._cond = pred
            return None
        if self._context != "uncond" or self._cond is None:
            return None
        cond, self._cond = self._cond, None
        n = len(self._ratios)
        if pred.shape[0] != n:
            raise RuntimeError(f"an uncond pass of {pred.shape[0]} rows, {n} samples planned")
        g = torch.tensor(self._ratios, dtype=pred.dtype, device=pred.device).view((n,) + (1,) * (pred.ndim - 1))
        big = self._used
        rewritten = (pred * (1 - g) + cond * (g - big)) / (1 - big)
        new = torch.where(g == big, pred, rewritten)
        if isinstance(output, tuple):
            return (new, *output[1:])
        output.sample = new
        return output
