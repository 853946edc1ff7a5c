"""Cheap previews of latents mid-denoising: a linear map from latent channels to RGB at latent resolution,
never the VAE each step.

The map is fit once, on first use, to what the model's own VAE makes of random latents (least squares over
every latent pixel), so it works for every family's VAE, tiny test models included, with no table of
per-model factors. Where latents live differs by family (packed tokens, video frames): the family says.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from omni_grpc.engine.families.base import Family

# Latent side of the fit: 16 x 16 pixels x 4 samples is ~1000 equations for C + 1 unknowns per colour.
_FIT_SIDE = 16
_FIT_SAMPLES = 4


class LatentPreview:
    def __init__(self, pipe: Any, family: Family) -> None:
        self._pipe = pipe
        self._family = family
        self._lock = threading.Lock()
        self._map: torch.Tensor | None = None  # (C + 1) x 3: channels, then the bias

    def images(self, latents: torch.Tensor, height: int, width: int) -> list[Image.Image]:
        """One picture per sample of `latents` (as the denoiser sees them at a step end)."""
        grid = self._family.latent_grid(self._pipe, latents.detach(), height, width).float()
        weights = self._fit(grid.shape[1])
        rgb = torch.einsum("bchw,cd->bhwd", grid.cpu(), weights[:-1]) + weights[-1]
        pixels = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        return [Image.fromarray(np.ascontiguousarray(sample)) for sample in pixels]

    def _fit(self, channels: int) -> torch.Tensor:
        with self._lock:
            if self._map is None:
                self._map = self._least_squares(channels)
            return self._map

    @torch.no_grad()
    def _least_squares(self, channels: int) -> torch.Tensor:
        vae = self._pipe.vae
        generator = torch.Generator("cpu").manual_seed(0)
        latents = torch.randn((_FIT_SAMPLES, channels, _FIT_SIDE, _FIT_SIDE), generator=generator)
        decoded = self._family.decode_latent_grid(self._pipe, latents.to(vae.device, vae.dtype)).float().cpu()
        rgb = (decoded / 2 + 0.5).clamp(0, 1)
        pooled = torch.nn.functional.adaptive_avg_pool2d(rgb, _FIT_SIDE)
        inputs = torch.cat(
            [latents.permute(0, 2, 3, 1).reshape(-1, channels), torch.ones(latents.numel() // channels, 1)], 1
        )
        targets = pooled.permute(0, 2, 3, 1).reshape(-1, 3)
        solution: torch.Tensor = torch.linalg.lstsq(inputs, targets).solution
        return solution
