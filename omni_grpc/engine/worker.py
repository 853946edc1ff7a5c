"""The worker: one thread that puts jobs together and hands them the model, one turn at a time.

Plain jobs (model load, hook installs) run on the worker's thread, in arrival order. Batchable jobs
(generate requests) that share a batch key run together: the worker takes the oldest job in the queue and
adds queued jobs with the same key, oldest first, up to the size its `BatchSizer` gives (at most
`max_batch_size` samples; by default as many as fit). The oldest job always goes next, so no request waits
behind a stream of other shapes; and nothing waits for company: a lone request starts at once.

A batch runs on a thread of its own. While one runs, a batch much shorter than what is left of every
running one (fewer than half their remaining steps) starts beside it instead of waiting, up to
`max_running_batches`: the batches then take turns on the model step by step (see `turns`), so a huge
request never starves small ones, while requests of like length still queue and batch together.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from omni_grpc.engine.batch_sizer import BatchSizer
from omni_grpc.engine.turns import Turns
from omni_grpc.errors import Unavailable

T = TypeVar("T")
P = TypeVar("P")
log = logging.getLogger(__name__)


@dataclass
class BatchItem(Generic[P]):
    """One batchable job; the batch runner settles its future and counts its steps."""

    key: Hashable
    size: int
    payload: P
    # The turns it needs (denoising steps), and those it has had.
    steps: int = 1
    steps_done: int = 0
    # Set when its batch begins (before it: waiting in the queue).
    started: bool = False
    # Told its place in the queue (0: next) when it is queued and each time the place changes.
    on_position: Callable[[int], None] | None = None
    position: int = -1
    future: Future[Any] = field(default_factory=Future)


@dataclass
class _Job:
    fn: Callable[[], Any]
    future: Future[Any]


RunBatch = Callable[[list[BatchItem[P]]], None]


class Worker(Generic[P]):
    def __init__(
        self,
        max_batch_size: int = 1,
        max_running_batches: int = 1,
        name: str = "omni-worker",
        sizer: BatchSizer | None = None,
    ) -> None:
        self.sizer = sizer or BatchSizer(max_batch_size, policy="fill")
        self.max_running_batches = max(1, max_running_batches)
        self.turns = Turns()
        self._run_batch: RunBatch[P] | None = None
        self._queue: collections.deque[_Job | BatchItem[P]] = collections.deque()
        self._running: list[list[BatchItem[P]]] = []
        self._ready = threading.Condition()
        self._closed = False
        self._name = name
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def start_batching(self, run_batch: RunBatch[P]) -> None:
        """From now on batchable jobs are run by `run_batch` (once the model it needs is loaded)."""
        self._run_batch = run_batch

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Queue a plain job; its future carries the result or the exception."""
        job = _Job(fn, Future())
        with self._ready:
            if self._closed:
                job.future.set_exception(Unavailable("the engine is shutting down"))
            else:
                self._queue.append(job)
                self._ready.notify_all()
        return job.future

    def submit_batchables(self, items: list[BatchItem[P]]) -> None:
        """Queue several batchable jobs at once, so that the worker sees them together."""
        with self._ready:
            if self._closed or self._run_batch is None:
                reason = "the engine is shutting down" if self._closed else "the model is still loading"
                for item in items:
                    item.future.set_exception(Unavailable(reason))
                return
            self._queue.extend(items)
            self._ready.notify_all()
            moved = self._moved_locked()
        _tell(moved)

    def call(self, fn: Callable[[], T]) -> T:
        """Run a plain job with the model's turn and wait for it (inline when already on the worker)."""
        if threading.current_thread() is self._thread:
            return fn()
        return self.submit(fn).result()

    @property
    def queued(self) -> int:
        """Jobs waiting for the worker (not counting the running ones)."""
        with self._ready:
            return len(self._queue)

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued and running jobs, then stop."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        self._thread.join(timeout)

    def _may_start(self, head: BatchItem[P]) -> bool:
        """Whether a batch headed by `head` may start now (the caller holds the condition)."""
        if not self._running:
            return True
        if len(self._running) >= self.max_running_batches:
            return False
        # Beside running batches only when it is much shorter than what is left of each: it then finishes
        # long before them, instead of waiting for them to end.
        left = min(max(item.steps - item.steps_done for item in batch) for batch in self._running)
        return 2 * head.steps < left

    def _take(self) -> _Job | list[BatchItem[P]] | None:
        with self._ready:
            while True:
                if self._queue:
                    head = self._queue[0]
                    if isinstance(head, _Job):
                        self._queue.popleft()
                        return head
                    if self._may_start(head):
                        return self._form_batch()
                    # The head batch waits for a running one; plain jobs need no batch slot and go on.
                    job = next((item for item in self._queue if isinstance(item, _Job)), None)
                    if job is not None:
                        self._queue.remove(job)
                        return job
                elif self._closed and not self._running:
                    return None
                self._ready.wait()

    def _form_batch(self) -> list[BatchItem[P]]:
        head = self._queue.popleft()
        assert isinstance(head, BatchItem)
        mates = [item for item in self._queue if isinstance(item, BatchItem) and item.key == head.key]
        limit = self.sizer.size(head.key, head.size, head.size + sum(item.size for item in mates))
        batch, size = [head], head.size
        for item in mates:
            if size >= limit:
                break
            if size + item.size <= limit:
                self._queue.remove(item)
                batch.append(item)
                size += item.size
        self._running.append(batch)
        return batch

    def _moved_locked(self) -> list[tuple[Callable[[int], None], int]]:
        """The queued requests whose place changed, each with its new place (the caller holds the condition)."""
        moved = []
        ahead = 0
        for item in self._queue:
            if isinstance(item, BatchItem):
                if item.on_position is not None and item.position != ahead:
                    item.position = ahead
                    moved.append((item.on_position, ahead))
                ahead += 1
        return moved

    def _loop(self) -> None:
        while (work := self._take()) is not None:
            if isinstance(work, _Job):
                self._run_job(work)
            else:
                threading.Thread(target=self._run_batch_alone, args=(work,), name=f"{self._name}-batch").start()
                with self._ready:
                    moved = self._moved_locked()
                _tell(moved)
            # Drop the work here, not at the next take: its closures may hold adapter tensors.
            del work

    def _run_job(self, job: _Job) -> None:
        if job.future.set_running_or_notify_cancel():
            try:
                with self.turns.held():
                    result = job.fn()
                job.future.set_result(result)
            except BaseException as exc:  # noqa: BLE001 - the caller re-raises it
                job.future.set_exception(exc)

    def _run_batch_alone(self, batch: list[BatchItem[P]]) -> None:
        run_batch = self._run_batch
        assert run_batch is not None  # submit_batchables refuses items before start_batching
        try:
            with self.turns.held():
                run_batch(batch)
        except Exception as exc:  # fail every request of the batch, keep serving
            log.exception("batch of %d failed", len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        finally:
            with self._ready:
                self._running.remove(batch)
                self._ready.notify_all()


def _tell(moved: list[tuple[Callable[[int], None], int]]) -> None:
    for on_position, position in moved:
        try:
            on_position(position)
        except Exception:  # a listener's failure is not the queue's
            log.exception("a queue position listener failed")
