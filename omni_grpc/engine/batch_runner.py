"""What runs on the worker thread for a batch of requests: one pipeline call with each sample's adapter
and guidance, each request's future settled, and the recovery when a batch fails (out of memory, say):
its requests run one by one, so only the one that fails alone fails."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from omni_grpc.engine.batch_sizer import BatchSizer
from omni_grpc.engine.imaging import encode_image
from omni_grpc.engine.lora_set import LoraSet
from omni_grpc.engine.pipeline import LoadedPipeline, run_pipeline
from omni_grpc.engine.progress import Preview, Progress, Started, Step
from omni_grpc.engine.turns import Turns
from omni_grpc.engine.types import GeneratedImage, OutputFormat, Timings
from omni_grpc.engine.validation import ValidRequest
from omni_grpc.engine.worker import BatchItem
from omni_grpc.errors import Cancelled, DeadlineExceeded, FailedPrecondition, OmniError, ResourceExhausted
from omni_grpc.quoting import loggable

log = logging.getLogger("omni_grpc.requests")

# Raises to stop a request between denoising steps (its argument is the step just done; -1: before any).
StopCheck = Callable[[int], None]
# gRPC cancels a call whose deadline passed, and its timer may fire a moment before the deadline we hold.
_DEADLINE_SLACK_S = 0.25


@dataclass
class Work:
    """A request as the worker sees it."""

    request: ValidRequest
    # The adapters it runs with, by internal key, each with its scale (none, one or several: they compose).
    adapters: tuple[tuple[str, float], ...]
    # How errors name the request's adapters ("style#42@0.5,ink#7@1"), or "" without one.
    adapter_label: str
    check: StopCheck
    submitted: float
    timings: Timings
    # A streaming caller's events (None: nobody listens).
    progress: Progress | None = None


@dataclass
class Done:
    """A request's share of its batch's output."""

    images: list[Any]
    arrays: list[Any]
    batch_images: int


class _AllStopped(Exception):
    """Every request of a batch was cancelled or ran out of time."""


def stop_check(cancelled: Callable[[], bool] | None, deadline: float | None) -> StopCheck:
    """A per-step check that stops the denoising once the client has gone or its deadline passed."""

    def check(step: int) -> None:
        # The deadline first: gRPC also cancels a call whose deadline passed, and the log should say why.
        now = time.monotonic()
        if deadline is not None and now > deadline:
            raise DeadlineExceeded(f"deadline exceeded after {step + 1} denoising steps")
        if cancelled is not None and cancelled():
            if deadline is not None and now > deadline - _DEADLINE_SLACK_S:
                raise DeadlineExceeded(f"deadline exceeded after {step + 1} denoising steps")
            raise Cancelled(f"request cancelled by the client after {step + 1} denoising steps")

    return check


class BatchRunner:
    """Runs batches on the worker thread; the worker calls it with the requests it put together."""

    def __init__(
        self,
        pipeline: LoadedPipeline,
        lora: LoraSet,
        turns: Turns,
        on_batch: Callable[[int], None] | None = None,
        sizer: BatchSizer | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._lora = lora
        self._turns = turns
        # Told the images of each pipeline call it makes.
        self._on_batch = on_batch
        # Told what each pipeline call that had the model to itself cost, to size the next batches.
        self._sizer = sizer

    def __call__(self, items: list[BatchItem[Work]]) -> None:
        started = time.perf_counter()
        live: list[BatchItem[Work]] = []
        for item in items:
            item.started = True
            item.payload.timings.queue_ms = (started - item.payload.submitted) * 1000
            if not _settle_if_stopped(item, -1):
                live.append(item)
        if not live:
            return
        try:
            self._run_together(live, started)
            return
        except _AllStopped:
            return
        except Exception as exc:
            log.warning(
                "a batch of %d requests failed (%s: %s)", len(live), type(exc).__name__, loggable(exc), exc_info=True
            )
            failure = _detached(exc)
        # Out of the except clause, so the failed call's frames and their tensors can be freed first.
        _free_cached_memory()
        if len(live) == 1:
            raise failure
        # One request's failure (memory for the whole batch, a bad input) must not fail its batch mates:
        # run each alone; only the ones that fail alone fail.
        log.warning("running the %d requests of the failed batch one by one", len(live))
        for item in live:
            if item.future.done():
                continue
            error: Exception | None = None
            try:
                self._run_together([item], time.perf_counter())
            except _AllStopped:
                continue
            except Exception as alone:  # noqa: BLE001 - whatever fails alone fails that request only
                error = _detached(alone)
            if error is not None:
                _free_cached_memory()
                item.future.set_exception(error)

    def _report(self, live: list[BatchItem[Work]], step: int, latents: torch.Tensor, since: float) -> None:
        """Each streaming request's step, and a preview of its own samples when it asked for one now."""
        elapsed_ms = (time.perf_counter() - since) * 1000
        row = 0
        for item in live:
            n = len(item.payload.request.seeds)
            progress = item.payload.progress
            if progress is not None and not item.future.done():
                request = item.payload.request
                progress.sink(Step(step=step, total_steps=request.steps, elapsed_ms=elapsed_ms))
                if progress.wants_preview(step, request.steps):
                    pictures = self._pipeline.preview.images(latents[row : row + n], request.height, request.width)
                    images = [
                        GeneratedImage(
                            picture, seed, data=encode_image(picture, OutputFormat.PNG), mime_type="image/png"
                        )
                        for picture, seed in zip(pictures, request.seeds, strict=True)
                    ]
                    progress.sink(Preview(step=step, images=images))
            row += n

    def _run_together(self, live: list[BatchItem[Work]], started: float) -> None:
        """One pipeline call for `live`; fills each request's future."""
        samples: list[tuple[tuple[str, float], ...]] = []
        prompts: list[str] = []
        negatives: list[str] = []
        seeds: list[int] = []
        guidance: list[float] = []
        for item in live:
            work = item.payload
            n = len(work.request.seeds)
            samples += [work.adapters] * n
            prompts += [work.request.prompt] * n
            negatives += [work.request.negative_prompt] * n
            seeds += work.request.seeds
            guidance += [work.request.guidance_scale] * n
        used_guidance = guidance[0]
        first = live[0].payload.request

        pipeline = self._pipeline
        plan = self._lora.plan_for(samples)
        for item in live:
            if item.payload.progress is not None:
                item.payload.progress.sink(Started(batch_size=len(seeds)))

        shared = False  # whether another batch or job had the model between this call's steps

        def resume() -> None:
            # Another batch may have had the model since this one's last step: put this one's state back. The
            # text encoders' part of the plan applies while the pipeline encodes the prompts, in its first turn.
            self._lora.activate(plan)
            pipeline.guidance.set(guidance, used_guidance)

        def on_step(step: int, latents: torch.Tensor) -> None:
            finite = torch.isfinite(latents.flatten(1)).all(1).tolist()
            row = 0
            for item in live:
                n = len(item.payload.request.seeds)
                if not item.future.done():
                    item.steps_done = step + 1
                    if not all(finite[row : row + n]):
                        item.future.set_exception(_non_finite(item))
                row += n
            self._report(live, step + 1, latents, denoise_start)
            if self._turns.pass_if_waiting():  # a batch or job waits for the model: one step each
                nonlocal shared
                shared = True
                resume()
            # A stopped request is answered at once; the others go on. Stop when none is left.
            stopped = [_settle_if_stopped(item, step) for item in live]  # every one, no short-circuit
            if all(stopped):
                raise _AllStopped

        resume()
        if self._on_batch is not None:
            self._on_batch(len(seeds))
        activation_ms = (time.perf_counter() - started) * 1000
        denoise_start = time.perf_counter()
        try:
            output = run_pipeline(
                pipeline,
                prompts=prompts,
                negative_prompts=negatives,
                height=first.height,
                width=first.width,
                steps=first.steps,
                guidance_scale=used_guidance,
                seeds=seeds,
                on_step=on_step,
                num_frames=first.num_frames or None,
            )
        finally:
            self._lora.activate(None)
            pipeline.guidance.clear()
        inference_ms = (time.perf_counter() - denoise_start) * 1000
        if self._sizer is not None and not shared:
            self._sizer.observe(live[0].key, len(seeds), inference_ms / 1000)
        offset = 0
        for item in live:
            work = item.payload
            n = len(work.request.seeds)
            work.timings.adapter_ms += activation_ms
            work.timings.inference_ms = inference_ms
            arrays = output.arrays[offset : offset + n]
            if not item.future.done():
                if all(np.isfinite(array).all() for array in arrays):
                    item.future.set_result(Done(output.images[offset : offset + n], arrays, len(seeds)))
                else:  # finite latents, decoded to NaN or Inf (a VAE in half precision, say)
                    item.future.set_exception(_non_finite(item))
            offset += n


def _non_finite(item: BatchItem[Work]) -> OmniError:
    """A sample whose values overflowed: that request fails alone, naming what it ran with."""
    if item.payload.adapter_label:
        return FailedPrecondition(
            f"the denoiser produced non-finite values for this request after {item.steps_done} steps with adapters "
            f"{item.payload.adapter_label}: their weights (or scales) are too large for this model"
        )
    return OmniError(f"the model produced non-finite values for this request after {item.steps_done} steps")


def _settle_if_stopped(item: BatchItem[Work], step: int) -> bool:
    """Fail the item's future if its request should stop; True if it did (or was already done)."""
    if item.future.done():
        return True
    try:
        item.payload.check(step)
    except OmniError as exc:
        item.future.set_exception(exc)
        return True
    return False


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _detached(exc: Exception) -> Exception:
    """The error to hand to the request, holding no frames (they pin the failed batch's tensors).

    Out of memory is the client's to fix (fewer images, a smaller size): RESOURCE_EXHAUSTED, not INTERNAL.
    """
    if _is_out_of_memory(exc):
        return ResourceExhausted("out of memory for this request; retry with fewer images or a smaller size")
    exc.__traceback__ = None
    exc.__context__ = exc.__cause__ = None
    return exc


def _free_cached_memory() -> None:
    gc.collect()  # frames and tensors caught in reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
