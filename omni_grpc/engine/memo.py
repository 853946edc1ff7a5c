"""A small, bounded, thread-safe map that forgets the least recently used entry first.

Adapter loads keep in one what a file's header alone decides (fine-tunes made with one recipe share their
layout byte for byte, and judging it again for each costs more than reading a small adapter's tensors); the
batch sizer keeps what each batch shape has cost (clients choose the shapes: the map must stay bounded).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Memo(Generic[K, V]):
    def __init__(self, entries: int) -> None:
        self._entries = entries
        self._values: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._values.get(key)
            if value is not None:
                self._values.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._values[key] = value
            self._values.move_to_end(key)
            while len(self._values) > self._entries:
                self._values.popitem(last=False)

    def items(self) -> list[tuple[K, V]]:
        """A snapshot, least recently used first."""
        with self._lock:
            return list(self._values.items())

    def __len__(self) -> int:
        return len(self._values)
