"""The plain diffusers way, done well: one pipeline, every adapter loaded once, `set_adapters` per
request, one request at a time."""

from __future__ import annotations

import io
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from omni_grpc.engine.imaging import encode_mp4
from omni_grpc.engine.pipeline import resolve_device, resolve_dtype


class DiffusersBaseline:
    def __init__(
        self, model: Path, adapters: list[Path], *, frames: int | None = None, device: str | None = None
    ) -> None:
        self.frames = frames
        # The device and dtype the engine would pick (a GPU in bfloat16, else a CPU in float32).
        dev = resolve_device(device)
        dtype = resolve_dtype("auto", dev)
        index = json.loads((model / "model_index.json").read_text())
        # Components saved as [null, null] (SD3 without T5) are passed as None, or from_pretrained raises.
        absent = {key: None for key, value in index.items() if isinstance(value, list) and value == [None, None]}
        self.pipe = DiffusionPipeline.from_pretrained(str(model), local_files_only=True, dtype=dtype, **absent).to(dev)
        self.pipe.set_progress_bar_config(disable=True)
        denoiser = getattr(self.pipe, "transformer", None) or self.pipe.unet
        self.names: dict[Path, str] = {}
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        for i, folder in enumerate(adapters):
            state = {
                k.removeprefix("base_model.model."): v
                for k, v in load_file(folder / "adapter_model.safetensors").items()
            }
            config = json.loads((folder / "adapter_config.json").read_text())
            metadata = {
                "r": config["r"],
                "lora_alpha": config["lora_alpha"],
                "target_modules": config["target_modules"],
            }
            # Passing the config as metadata is what makes alpha != r load right (see NOTES).
            denoiser.load_lora_adapter(state, prefix=None, adapter_name=f"a{i}", metadata=metadata)
            self.names[folder] = f"a{i}"

    def generate(self, *, adapter: Path | None, scale: float, size: int, steps: int, seed: int) -> float:
        """One request; returns its latency in seconds."""
        started = time.perf_counter()
        self.run(adapter=adapter, scale=scale, size=size, steps=steps, seed=seed, output_type="pil")
        return time.perf_counter() - started

    def run(self, *, adapter: Path | None, scale: float, size: int, steps: int, seed: int, output_type: str) -> Any:
        """One request's pipeline output (PNG- or MP4-encoded too, as a service does, when `output_type` is "pil")."""
        if adapter is None:
            self.pipe.disable_lora()
        else:
            self.pipe.enable_lora()
            self.pipe.set_adapters([self.names[adapter]], adapter_weights=[scale])
        video = {"num_frames": self.frames} if self.frames else {}
        output = self.pipe(
            prompt="a benchmark prompt",
            height=size,
            width=size,
            num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type=output_type,
            **video,
        )
        if output_type != "pil":
            return output
        # A service hands out encoded images (or MP4s), as omni-grpc does.
        if self.frames:
            encode_mp4(output.frames[0], 16)
        else:
            output.images[0].save(io.BytesIO(), format="PNG")
        return output
