"""The adapter table's backend on a real pipeline: read an adapter's files, check it fits the pipeline's
parts, attach it to the per-sample LoRA layers, move it between memory tiers.

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

from omni_grpc.engine.adapter_files import AdapterLayout, AdapterReader, LayoutMemo
from omni_grpc.engine.adapter_math import ModuleFit
from omni_grpc.engine.adapters import LoadedAdapter, Tier
from omni_grpc.engine.file_layouts import Naming
from omni_grpc.engine.lora_set import LoraSet
from omni_grpc.engine.path_policy import PathPolicy
from omni_grpc.engine.worker import Worker
from omni_grpc.errors import ResourceExhausted

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


class PipelineFit:
    """The pipeline's verdict on an adapter's layout, given before its tensors are read: components, module
    names and shapes, then room in the loading budget for what the load will allocate."""

    def __init__(self, lora: LoraSet, session: _Session) -> None:
        self._lora = lora
        self._session = session
        self.naming: Naming = lora
        self.max_abs_weight = lora.max_abs_weight
        self.max_tensors = lora.max_tensors

    def check(self, layout: AdapterLayout) -> dict[str, ModuleFit]:
        return self._lora.check_layout(layout)  # names the first module that does not fit: the most useful refusal

    def reserve(self, nbytes: int, what: str) -> None:
        self._session.reserve(nbytes, what)


class PipelineAdapters:
    def __init__(
        self, worker: Worker[Any], lora: LoraSet, max_rank: int, paths: PathPolicy, budget: LoadingBudget
    ) -> None:
        self._worker = worker
        self._lora = lora
        self._max_rank = max_rank
        self._paths = paths
        self.budget = budget
        # The model's verdicts on layouts it accepted: the model and max_rank never change for this backend.
        self._layouts = LayoutMemo()

    def load(self, path: str, internal_name: str, expert: str = "") -> LoadedAdapter:
        # Operators' adapters (--lora-path) may live anywhere; clients' only inside --lora-dirs.
        may_open = None if self._paths.is_operator_path(path) else self._paths.may_open
        with self.budget.session() as session:
            fit = PipelineFit(self._lora, session)
            reader = AdapterReader(
                max_rank=self._max_rank, may_open=may_open, fit=fit, expert=expert or None, memo=self._layouts
            )
            weights = reader.read(path)
            slots = self._lora.make_slots(weights)
            loaded = LoadedAdapter(
                format=weights.format,
                rank=weights.rank,
                alpha=weights.alpha,
                target_modules=weights.target_modules,
                size_bytes=sum(slot.nbytes for slot in slots.values()),
                num_layers=sum(len(slot.modules) for slot in slots.values()),
                components=sorted({self._lora.display_name(c) for c in slots}, key=_denoiser_first),
                files=weights.files,
            )
            del weights  # the tensors as read go now, within the budget, not when this frame ends
        if self._lora.needs_hooks(slots):
            self._worker.call(lambda: self._lora.install_hooks(slots))
        self._lora.attach(internal_name, slots)
        return loaded

    def unload(self, internal_name: str) -> None:
        # Immediate: a running batch keeps its own reference to the slots until it ends.
        self._lora.detach(internal_name)

    def move(self, internal_name: str, tier: Tier) -> None:
        self._lora.move(internal_name, self._lora.device if tier is Tier.DEVICE else self._lora.host_device)


def _denoiser_first(component: str) -> tuple[bool, str]:
    return component != "denoiser", component
