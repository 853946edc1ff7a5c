"""A request's progress as it happens, for streaming callers: its place in the queue, its batch starting, each
denoising step, and previews of its own samples. Plain values; a sink is called from the engine's threads and
must be quick (hand the event to another thread, never block)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from omni_grpc.engine.types import AppliedAdapter, GeneratedImage


@dataclass(frozen=True)
class Queued:
    # Requests ahead of this one in the queue (0: next).
    position: int


@dataclass(frozen=True)
class Started:
    # Images in the denoising batch it joined (its batch mates' included).
    batch_size: int
    adapters: list[AppliedAdapter] = field(default_factory=list)


@dataclass(frozen=True)
class Step:
    step: int
    total_steps: int
    elapsed_ms: float


@dataclass(frozen=True)
class Preview:
    step: int
    # One small PNG per image of the request (a video's: its first frame), from its own latents.
    images: list[GeneratedImage]


ProgressEvent = Queued | Started | Step | Preview
ProgressSink = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class Progress:
    """Where a request's events go, and every how many steps it wants a preview (0: none)."""

    sink: ProgressSink
    preview_every: int = 0

    def wants_preview(self, step: int, total_steps: int) -> bool:
        # The last step's picture is the result itself.
        return self.preview_every > 0 and step % self.preview_every == 0 and step < total_steps
