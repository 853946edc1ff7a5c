"""Turns on the model: one holder at a time, handed over in the order they were asked for.

Several batches may be in flight at once, each on a thread of its own, and plain jobs (model load, hook
installs) need the model too; only the holder of the turn touches it. A running batch passes the turn at
every step boundary when someone is waiting, so a long batch cannot starve the ones that arrive after
it: each waits at most one step of each one ahead of it.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Turns:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy = False
        self._waiting: collections.deque[threading.Event] = collections.deque()

    def acquire(self) -> None:
        with self._lock:
            if not self._busy:
                self._busy = True
                return
            handed = threading.Event()
            self._waiting.append(handed)
        handed.wait()  # release() hands the turn over: _busy stays True for us

    def release(self) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()
            else:
                self._busy = False

    @property
    def contended(self) -> bool:
        """Someone is waiting for the turn."""
        with self._lock:
            return bool(self._waiting)

    def pass_if_waiting(self) -> bool:
        """Hand the turn to the next in line and queue for it again; True if it was passed."""
        if not self.contended:
            return False
        self.release()
        self.acquire()
        return True

    @contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()
