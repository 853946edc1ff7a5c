"""How many samples the next batch of a shape takes: learned online from what batches of that shape cost.

Batching pays where a step's fixed cost dominates (a GPU, a tiny model): a batch of 8 costs little more
than a batch of 1. Where the denoiser is compute-bound (a CPU at 512 px) a batch of 8 costs 8 batches of 1
or more, and batching only makes the first request of the batch wait for the last. So the worker asks a
`BatchSizer` for each batch's size; the batch runner tells it what each pipeline call cost, and it gives the
size with the most images per second, preferring the smaller of two sizes within `tolerance` of each other
(the same throughput, less waiting).

Costs are per batch key (size, steps, frames...: one shape), as the median of the last few calls of each
size. Sizes never run are estimated from the nearest ones that were (linearly between two; as free as the
largest one above it, so a larger batch gets tried; at the smallest one's per-image cost below it). Now and
then (`explore_every` batches) it runs a size next to the best one instead, so that one noisy figure (a
warm-up, a busy neighbour) does not decide for good. The oldest request always heads the next batch (the
worker's rule), so a smaller batch delays the rest by whole batches, never indefinitely.
"""

from __future__ import annotations

import collections
import statistics
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field

from omni_grpc.engine.memo import Memo

POLICIES = ("learned", "fill")


@dataclass
class _Shape:
    """What one batch key has shown: whether its warm-up call ran, its batches formed, its calls' seconds."""

    warmed: bool = False
    formed: int = 0
    costs: dict[int, collections.deque[float]] = field(default_factory=dict)


class BatchSizer:
    def __init__(
        self,
        max_size: int,
        *,
        policy: str = "learned",
        explore_every: int = 16,
        tolerance: float = 0.03,
        window: int = 5,
        max_shapes: int = 256,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"batch policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        self.max_size = max(1, max_size)
        self.policy = policy
        self._explore_every = explore_every
        self._tolerance = tolerance
        self._window = window
        self._lock = threading.Lock()
        # The shapes seen, the least recently used forgotten first: bounded, since clients choose the shapes.
        self._shapes: Memo[Hashable, _Shape] = Memo(max_shapes)

    def size(self, key: Hashable, head: int, waiting: int) -> int:
        """Samples the next batch of `key` takes: at least the head request's `head`, at most the `waiting`
        samples queued with that key (head included) and `max_size`."""
        cap = max(head, min(self.max_size, waiting))
        if self.policy == "fill" or cap == head:
            return cap
        with self._lock:
            shape = self._shape_locked(key)
            costs = {n: statistics.median(times) for n, times in shape.costs.items()}
            shape.formed += 1
            formed = shape.formed
        if not costs:
            return cap
        best = self._best(costs, head, cap)
        if formed % self._explore_every == 0:
            # Alternately a size up and a size down, so both neighbours of the best get measured again.
            up, down = min(cap, best * 2), max(head, best // 2)
            first, second = (up, down) if formed // self._explore_every % 2 else (down, up)
            return first if first != best else second
        return best

    def observe(self, key: Hashable, samples: int, seconds: float) -> None:
        """A pipeline call of `samples` samples of `key` took `seconds`, with the model to itself."""
        if seconds <= 0:
            return
        with self._lock:
            shape = self._shape_locked(key)
            if not shape.warmed:  # a shape's first call pays one-time costs (allocations, kernel choice)
                shape.warmed = True
                return
            shape.costs.setdefault(samples, collections.deque(maxlen=self._window)).append(seconds)

    def _shape_locked(self, key: Hashable) -> _Shape:
        shape = self._shapes.get(key)
        if shape is None:
            shape = _Shape()
            self._shapes.put(key, shape)
        return shape

    def learned(self) -> dict[Hashable, dict[int, float]]:
        """Per batch key, the median seconds of a call of each size measured."""
        with self._lock:
            return {
                key: {n: statistics.median(times) for n, times in sorted(shape.costs.items())}
                for key, shape in self._shapes.items()
                if shape.costs
            }

    def _best(self, costs: dict[int, float], head: int, cap: int) -> int:
        rates = {n: n / _estimate(costs, n) for n in range(head, cap + 1)}
        top = max(rates.values())
        return min(n for n, rate in rates.items() if rate >= top * (1 - self._tolerance))


def _estimate(costs: dict[int, float], n: int) -> float:
    """The cost of a call of `n` samples, from the sizes measured."""
    if n in costs:
        return costs[n]
    below = [m for m in costs if m < n]
    above = [m for m in costs if m > n]
    if below and above:
        lo, hi = max(below), min(above)
        return costs[lo] + (costs[hi] - costs[lo]) * (n - lo) / (hi - lo)
    if below:  # larger than any measured: assume it costs what the largest did, so that it gets tried
        return costs[max(below)]
    smallest = min(above)  # smaller than any measured: at the smallest one's cost per image
    return costs[smallest] * n / smallest
