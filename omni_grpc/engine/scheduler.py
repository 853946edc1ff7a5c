"""The worker: one thread that owns the pipeline and runs every job that touches it, in order.

Running all pipeline and LoRA-layer work on one thread keeps the model free of locks and keeps the
server's I/O threads free: callers submit a job and wait on its future.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from omni_grpc.errors import Unavailable

T = TypeVar("T")
log = logging.getLogger(__name__)
_STOP = object()


class Worker:
    def __init__(self, name: str = "omni-worker") -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Queue a job; its future carries the result or the exception."""
        future: Future[T] = Future()
        if self._closed:
            future.set_exception(Unavailable("the engine is shutting down"))
            return future
        self._jobs.put((fn, future))
        return future

    def call(self, fn: Callable[[], T]) -> T:
        """Run a job on the worker and wait for it (inline when already on the worker)."""
        if threading.current_thread() is self._thread:
            return fn()
        return self.submit(fn).result()

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued jobs, then stop."""
        if not self._closed:
            self._closed = True
            self._jobs.put(_STOP)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            item = self._jobs.get()
            if item is _STOP:
                return
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - the caller re-raises it
                future.set_exception(exc)
