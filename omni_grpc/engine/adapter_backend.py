"""The adapter table's backend on a real pipeline: read an adapter's files, check it fits the denoiser,
attach it to the per-sample LoRA layers, move it between memory tiers.

Reading, converting and (de)registering adapters happen on the calling thread, so loads never queue
behind running batches; only a module's first hook needs the worker that owns the model.
"""

from __future__ import annotations

from typing import Any

from omni_grpc.engine.adapter_files import AdapterReader
from omni_grpc.engine.adapters import LoadedAdapter, Tier
from omni_grpc.engine.lora_layers import MultiLora
from omni_grpc.engine.path_policy import PathPolicy
from omni_grpc.engine.worker import Worker


class PipelineAdapters:
    def __init__(self, worker: Worker[Any], lora: MultiLora, max_rank: int, paths: PathPolicy) -> None:
        self._worker = worker
        self._lora = lora
        # Operators' adapters (--lora-path) may live anywhere; clients' only inside --lora-dirs.
        self._operator_reader = AdapterReader(max_rank=max_rank)
        self._client_reader = AdapterReader(max_rank=max_rank, may_open=paths.may_open)
        self._paths = paths

    def load(self, path: str, internal_name: str) -> LoadedAdapter:
        reader = self._operator_reader if self._paths.is_operator_path(path) else self._client_reader
        weights = reader.read(path)
        slot = self._lora.make_slot(weights)  # checks that the adapter fits the model
        if self._lora.needs_hooks(slot):
            self._worker.call(lambda: self._lora.install_hooks(slot))
        num_layers = self._lora.attach(internal_name, slot)
        return LoadedAdapter(
            format=weights.format,
            rank=weights.rank,
            alpha=weights.alpha,
            target_modules=weights.target_modules,
            size_bytes=slot.nbytes,
            num_layers=num_layers,
        )

    def unload(self, internal_name: str) -> None:
        # Immediate: a running batch keeps its own reference to the slot until it ends.
        self._lora.detach(internal_name)

    def move(self, internal_name: str, tier: Tier) -> None:
        self._lora.move(internal_name, self._lora.device if tier is Tier.DEVICE else self._lora.host_device)
