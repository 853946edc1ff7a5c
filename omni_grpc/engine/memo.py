"""Small, bounded, thread-safe maps: `Memo` forgets the least recently used entry first; `ModelFacts` keeps
the first ones it is told, for facts that never change.

Adapter loads keep in a Memo what a file's header alone decides (fine-tunes made with one recipe share their
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
        self.put_all([(key, value)])

    def get_all(self, keys: list[K]) -> list[V | None]:
        """`get` of each key, under one lock (a layout asks for hundreds at once). Their use is recorded only once
        the memo is half full: until it is full nothing is forgotten, and a key used since then is kept longer
        than one not (the order of those not used since matters little)."""
        with self._lock:
            values = list(map(self._values.get, keys))
            if 2 * len(self._values) > self._entries:
                for key, value in zip(keys, values, strict=True):
                    if value is not None:
                        self._values.move_to_end(key)
            return values

    def put_all(self, items: list[tuple[K, V]]) -> None:
        with self._lock:
            self._values.update(items)
            for key, _ in items:
                self._values.move_to_end(key)
            while len(self._values) > self._entries:
                self._values.popitem(last=False)

    def items(self) -> list[tuple[K, V]]:
        """A snapshot, least recently used first."""
        with self._lock:
            return list(self._values.items())

    def __len__(self) -> int:
        return len(self._values)


class ModelFacts(dict[K, V]):
    """Facts about a model that never change once found (a module's resolved name, a delta's shape): a plain
    dict, read without a lock (a dict read is atomic, and a load of a new layout asks for every one of its
    modules), that keeps only the first `entries` facts it is told (more than any model has modules)."""

    def __init__(self, entries: int) -> None:
        super().__init__()
        self._entries = entries

    def put(self, key: K, value: V) -> None:
        if len(self) < self._entries:
            self[key] = value
