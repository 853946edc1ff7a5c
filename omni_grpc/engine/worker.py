"""The worker: one thread that owns the pipeline and runs every job that touches it.

Plain jobs (model load, hook installs) run one at a time in arrival order. Batchable jobs (generate
requests) that share a batch key are run together by the batch runner: the worker takes the oldest job in
the queue and adds every queued job with the same key, oldest first, up to `max_batch_size` samples. The
oldest job always goes next, so no request waits behind a stream of other shapes; and nothing waits for
company: a lone request starts at once.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from omni_grpc.errors import Unavailable

T = TypeVar("T")
P = TypeVar("P")
log = logging.getLogger(__name__)


@dataclass
class BatchItem(Generic[P]):
    """One batchable job; the batch runner settles its future."""

    key: Hashable
    size: int
    payload: P
    future: Future[Any] = field(default_factory=Future)


@dataclass
class _Job:
    fn: Callable[[], Any]
    future: Future[Any]


RunBatch = Callable[[list[BatchItem[P]]], None]


class Worker(Generic[P]):
    def __init__(self, max_batch_size: int = 1, name: str = "omni-worker") -> None:
        self.max_batch_size = max_batch_size
        self._run_batch: RunBatch[P] | None = None
        self._queue: collections.deque[_Job | BatchItem[P]] = collections.deque()
        self._ready = threading.Condition()
        self._closed = False
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
                self._ready.notify()
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
            self._ready.notify()

    def call(self, fn: Callable[[], T]) -> T:
        """Run a plain job on the worker and wait for it (inline when already on the worker)."""
        if threading.current_thread() is self._thread:
            return fn()
        return self.submit(fn).result()

    @property
    def queued(self) -> int:
        """Jobs waiting for the worker (not counting the one running)."""
        with self._ready:
            return len(self._queue)

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued jobs, then stop."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        self._thread.join(timeout)

    def _take(self) -> _Job | list[BatchItem[P]] | None:
        with self._ready:
            while not self._queue:
                if self._closed:
                    return None
                self._ready.wait()
            head = self._queue.popleft()
            if isinstance(head, _Job):
                return head
            batch, size = [head], head.size
            for item in list(self._queue):
                if size >= self.max_batch_size:
                    break
                if isinstance(item, BatchItem) and item.key == head.key and size + item.size <= self.max_batch_size:
                    self._queue.remove(item)
                    batch.append(item)
                    size += item.size
            return batch

    def _loop(self) -> None:
        while (work := self._take()) is not None:
            self._run(work)
            # Drop the finished work here, not at the next take: its closures may hold adapter tensors.
            del work

    def _run(self, work: _Job | list[BatchItem[P]]) -> None:
        if isinstance(work, _Job):
            if work.future.set_running_or_notify_cancel():
                try:
                    work.future.set_result(work.fn())
                except BaseException as exc:  # noqa: BLE001 - the caller re-raises it
                    work.future.set_exception(exc)
            return
        run_batch = self._run_batch
        assert run_batch is not None  # submit_batchables refuses items before start_batching
        try:
            run_batch(work)
        except Exception as exc:  # fail every request of the batch, keep serving
            log.exception("batch of %d failed", len(work))
            for item in work:
                if not item.future.done():
                    item.future.set_exception(exc)
