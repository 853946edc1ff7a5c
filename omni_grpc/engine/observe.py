"""What the engine tells observers (the server's metrics): each request as it ends, each batch as it ran, and
a snapshot of its state on demand. Plain values only: the engine knows nothing of Prometheus."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class RequestRecord:
    """One generate request, as it ended."""

    # The gRPC status name of its outcome ("OK", "INVALID_ARGUMENT", ...).
    outcome: str
    queue_s: float
    inference_s: float
    total_s: float


@dataclass(frozen=True)
class EngineState:
    """The engine at one moment."""

    running: int
    waiting: int
    # Adapters per tier ("device", "host", "disk").
    tiers: dict[str, int]
    # Adapter reads, hits, promotions and evictions since start.
    adapter_totals: dict[str, int]
    # Names of the adapters that running and waiting requests hold (each once, sorted).
    running_adapters: list[str]
    waiting_adapters: list[str]
    # How many adapters may be on the device at once (0: no bound).
    max_device_adapters: int


class Observer(Protocol):
    def request_done(self, record: RequestRecord) -> None: ...

    def batch_done(self, images: int) -> None: ...
