"""Offline use, no server: the seed's `Omni(model=..., lora_path=...).generate(prompt, params)`."""

from __future__ import annotations

from collections.abc import Sequence

from omni_grpc.config import EngineConfig
from omni_grpc.engine.engine import Engine
from omni_grpc.engine.types import AdapterInfo, GenerateRequest, GenerateResult, LoraRequest, SamplingParams

# The seed's name for the sampling parameters.
OmniDiffusionSamplingParams = SamplingParams


class Omni:
    """One pipeline with its adapter table, in this process.

    `lora_path` pre-loads (and pins) adapters, as `--lora-path` does for the server.
    """

    def __init__(
        self,
        model: str | None = None,
        lora_path: str | Sequence[str] | None = None,
        *,
        device: str | None = None,
        dtype: str = "auto",
        max_loaded_adapters: int = 1024,
        progress_bar: bool = True,
        config: EngineConfig | None = None,
    ) -> None:
        paths = [lora_path] if isinstance(lora_path, str) else list(lora_path or [])
        self.config = config or EngineConfig(
            model=model,
            device=device,
            dtype=dtype,
            lora_paths=paths,
            max_loaded_adapters=max_loaded_adapters,
            progress_bar=progress_bar,
            # Offline, the caller is the operator: any adapter path it names is its own choice.
            allow_any_lora_path=True,
            # A Python caller may hand over any number of prompts at once.
            max_queue=0,
        )
        self.engine = Engine(self.config).start()

    def generate(
        self,
        prompt: str | Sequence[str],
        sampling_params: SamplingParams | None = None,
        *,
        negative_prompt: str = "",
    ) -> list[GenerateResult]:
        """One result per prompt; each holds `images` (PIL) with their seeds."""
        params = sampling_params or SamplingParams()
        lora = LoraRequest.coerce(params.lora_request)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        # Queued together, the prompts share denoising batches (up to max_batch_size images).
        return self.engine.generate_many(
            [GenerateRequest(prompt=p, negative_prompt=negative_prompt, sampling=params, lora=lora) for p in prompts]
        )

    def load_adapter(self, path: str, *, name: str | None = None, pin: bool = False) -> AdapterInfo:
        return self.engine.load_adapter(path, name=name, pin=pin)[0]

    def unload_adapter(self, name: str) -> AdapterInfo:
        return self.engine.unload_adapter(name=name)

    def list_adapters(self) -> list[AdapterInfo]:
        return self.engine.list_adapters()

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Omni:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
