"""The adapter table's backend on a real pipeline: read an adapter's files, check it fits the denoiser,
attach it to the per-sample LoRA layers, move it between memory tiers.

Reading, converting and (de)registering adapters happen on the calling thread, so loads never queue
behind running batches; only a module's first hook needs the worker that owns the model. Loads in
progress share one memory budget (--max-loading-bytes): a load reserves what it will allocate once its
header has been judged, and waits for room (or is refused) before it reads a byte of tensor data.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from omni_grpc.engine.adapter_files import AdapterLayout, AdapterReader
from omni_grpc.engine.adapters import LoadedAdapter, Tier
from omni_grpc.engine.lora_layers import MultiLora
from omni_grpc.engine.path_policy import PathPolicy
from omni_grpc.engine.worker import Worker
from omni_grpc.errors import InvalidArgument, ResourceExhausted

LOADING_BYTES_FLAG = "--max-loading-bytes"


class LoadingBudget:
    """Bytes that adapter loads in progress may hold at once; a load waits up to `wait_s` for room."""

    def __init__(self, limit: int, wait_s: float = 30.0) -> None:
        self.limit = limit
        self._wait_s = wait_s
        self._used = 0
        self._room = threading.Condition()

    @property
    def used(self) -> int:
        with self._room:
            return self._used

    @contextmanager
    def session(self) -> Iterator[_Session]:
        """One load's reservations, all returned when it ends (succeeded or failed)."""
        session = _Session(self)
        try:
            yield session
        finally:
            self._release(session.held)

    def _reserve(self, nbytes: int, what: str) -> None:
        if nbytes > self.limit:
            raise ResourceExhausted(
                f"{what} needs {nbytes} bytes to load, more than this server allows loads to hold at once "
                f"({self.limit}, {LOADING_BYTES_FLAG})"
            )
        end = time.monotonic() + self._wait_s
        with self._room:
            while self._used + nbytes > self.limit:
                left = end - time.monotonic()
                if left <= 0:
                    raise ResourceExhausted(
                        f"adapter loads in progress hold {self._used} of {self.limit} bytes ({LOADING_BYTES_FLAG}); "
                        f"{what} needs {nbytes}: retry later"
                    )
                self._room.wait(left)
            self._used += nbytes

    def _release(self, nbytes: int) -> None:
        if nbytes:
            with self._room:
                self._used -= nbytes
                self._room.notify_all()


class _Session:
    def __init__(self, budget: LoadingBudget) -> None:
        self._budget = budget
        self.held = 0

    def reserve(self, nbytes: int, what: str) -> None:
        self._budget._reserve(nbytes, what)  # noqa: SLF001 - the session is the budget's own handle
        self.held += nbytes


class DenoiserFit:
    """The denoiser's verdict on an adapter's layout, given before its tensors are read: module names and
    shapes, a byte cap sized to the model, and room in the loading budget."""

    def __init__(self, lora: MultiLora, max_adapter_bytes: int, session: _Session) -> None:
        self._lora = lora
        self._max_bytes = max_adapter_bytes
        self._session = session
        self.max_abs_weight = lora.max_abs_weight

    def check(self, layout: AdapterLayout) -> None:
        self._lora.check_fits(layout)  # names the first module that does not fit: the most useful refusal
        nbytes = layout.nbytes
        if nbytes > self._max_bytes:  # what fits can be no larger; a guard should a format declare more
            raise InvalidArgument(
                f"adapter {layout.path!r} declares {nbytes} bytes of weights; no adapter of this model within the "
                f"rank limit can be larger than {self._max_bytes}",
                field="path",
            )
        # Read into tensors, then converted to the model's dtype and device: at most twice the file's data.
        self._session.reserve(2 * nbytes, f"adapter {layout.path!r}")


class PipelineAdapters:
    def __init__(
        self, worker: Worker[Any], lora: MultiLora, max_rank: int, paths: PathPolicy, budget: LoadingBudget
    ) -> None:
        self._worker = worker
        self._lora = lora
        self._max_rank = max_rank
        self._max_bytes = lora.max_adapter_bytes(max_rank)
        self._paths = paths
        self.budget = budget

    def load(self, path: str, internal_name: str) -> LoadedAdapter:
        # Operators' adapters (--lora-path) may live anywhere; clients' only inside --lora-dirs.
        may_open = None if self._paths.is_operator_path(path) else self._paths.may_open
        with self.budget.session() as session:
            fit = DenoiserFit(self._lora, self._max_bytes, session)
            weights = AdapterReader(max_rank=self._max_rank, may_open=may_open, fit=fit).read(path)
            slot = self._lora.make_slot(weights)
            loaded = LoadedAdapter(
                format=weights.format,
                rank=weights.rank,
                alpha=weights.alpha,
                target_modules=weights.target_modules,
                size_bytes=slot.nbytes,
                num_layers=len(slot.modules),
            )
            del weights  # the tensors as read go now, within the budget, not when this frame ends
        if self._lora.needs_hooks(slot):
            self._worker.call(lambda: self._lora.install_hooks(slot))
        self._lora.attach(internal_name, slot)
        return loaded

    def unload(self, internal_name: str) -> None:
        # Immediate: a running batch keeps its own reference to the slot until it ends.
        self._lora.detach(internal_name)

    def move(self, internal_name: str, tier: Tier) -> None:
        self._lora.move(internal_name, self._lora.device if tier is Tier.DEVICE else self._lora.host_device)
