"""The engine: the pipeline, the adapter table and the worker, behind a blocking, thread-safe API.

It knows nothing of gRPC. The servicer, the offline `Omni` API and the example scripts all call it.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from omni_grpc.config import EngineConfig
from omni_grpc.engine import lora_io
from omni_grpc.engine.adapters import (
    AdapterLease,
    AdapterTable,
    LoadedAdapter,
    Tier,
    normalize_path,
    parse_lora_spec,
)
from omni_grpc.engine.imaging import encode_image
from omni_grpc.engine.lora_layers import MultiLora
from omni_grpc.engine.path_policy import PathPolicy
from omni_grpc.engine.pipeline import LoadedPipeline, load_pipeline, run_pipeline
from omni_grpc.engine.scheduler import BatchItem, Worker
from omni_grpc.engine.types import (
    AdapterInfo,
    AppliedAdapter,
    GeneratedImage,
    GenerateRequest,
    GenerateResult,
    LoraRequest,
    Timings,
)
from omni_grpc.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    OmniError,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger("omni_grpc.requests")
MAX_SEED = (1 << 64) - 1


@dataclass
class _Plan:
    """A validated request with every default filled in."""

    prompt: str
    negative_prompt: str
    height: int
    width: int
    steps: int
    guidance_scale: float
    seeds: list[int]


@dataclass
class _Work:
    """A request as the worker sees it."""

    plan: _Plan
    adapter_key: str | None
    scale: float
    check: Callable[[int], None]
    submitted: float
    timings: Timings

    @property
    def batch_key(self) -> tuple[int, int, int, bool, bool]:
        # Requests of one shape share a denoising batch; guidance scales may differ, on/off may not.
        # A negative prompt or none also may not: SDXL encodes "no negative prompt" as zeros, which
        # it can only do for a whole batch.
        plan = self.plan
        return (plan.height, plan.width, plan.steps, plan.guidance_scale > 1, bool(plan.negative_prompt))


@dataclass
class _Admission:
    """One request from arrival to its log line."""

    request_id: int
    request: GenerateRequest
    arrived: float = field(default_factory=time.perf_counter)
    timings: Timings = field(default_factory=Timings)
    plan: _Plan | None = None
    lease: AdapterLease | None = None
    item: BatchItem | None = None
    # NOT_RUN until it succeeds or fails (a batch mate's error can stop it from being waited for).
    outcome: str = "NOT_RUN"
    batch_images: int = 0


@dataclass
class _Done:
    images: list[Any]
    arrays: list[Any]
    batch_images: int


class _AllStopped(Exception):
    """Every request of a batch was cancelled or ran out of time."""


def _outcome(exc: BaseException) -> str:
    """The log's name for how a request failed: its gRPC status name."""
    return exc.code if isinstance(exc, OmniError) else "INTERNAL"


def _settle_if_stopped(item: BatchItem, step: int) -> bool:
    """Fail the item's future if its request should stop; True if it did (or was already done)."""
    if item.future.done():
        return True
    try:
        item.payload.check(step)
    except OmniError as exc:
        item.future.set_exception(exc)
        return True
    return False


class _PipelineAdapters:
    """The adapter table's backend. Reading, converting and (de)registering adapters happen on the
    calling thread, so loads never queue behind running batches; only a module's first hook needs the
    worker."""

    def __init__(self, worker: Worker, lora: MultiLora, max_rank: int, paths: PathPolicy) -> None:
        self._worker = worker
        self._lora = lora
        self._max_rank = max_rank
        self._paths = paths

    def load(self, path: str, internal_name: str) -> LoadedAdapter:
        may_open = None if self._paths.is_operator_path(path) else self._paths.may_open
        weights = lora_io.read_adapter(path, max_rank=self._max_rank, may_open=may_open)
        slot = self._lora.make_slot(weights)  # checks that the adapter fits the model
        if self._lora.needs_hooks(slot):
            self._worker.call(lambda: self._lora.install_hooks(slot))
        num_layers = self._lora.attach(internal_name, slot)
        return LoadedAdapter(
            format=weights.format,
            rank=weights.rank,
            alpha=weights.alpha,
            target_modules=weights.target_modules,
            size_bytes=slot.nbytes,
            num_layers=num_layers,
        )

    def unload(self, internal_name: str) -> None:
        # Immediate: a running batch keeps its own reference to the slot until it ends.
        self._lora.detach(internal_name)

    def move(self, internal_name: str, tier: Tier) -> None:
        self._lora.move(internal_name, self._lora.device if tier is Tier.DEVICE else self._lora.host_device)


class Engine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self._worker = Worker(self._run_batch, max_batch_size=self.config.max_batch_size)
        self._pipeline: LoadedPipeline | None = None
        self._table: AdapterTable | None = None
        self._lora: MultiLora | None = None
        self._ready = threading.Event()
        self._request_ids = itertools.count(1)
        self._paths = PathPolicy(self.config.lora_dirs, allow_any=self.config.allow_any_lora_path)
        # Generate requests inside the engine (waiting or running), for the --max-queue bound.
        self._outstanding = 0
        self._outstanding_lock = threading.Lock()

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Engine:
        """Load the model (on the worker) and the pre-loaded adapters. Blocking; raises ModelLoadError."""
        cfg = self.config
        if cfg.torch_threads:
            import torch

            torch.set_num_threads(cfg.torch_threads)
            log.info("torch uses %d CPU threads (--torch-threads)", cfg.torch_threads)
        self._pipeline = self._worker.call(
            lambda: load_pipeline(
                cfg.model, device=cfg.device, dtype=cfg.dtype, cache_dir=cfg.cache_dir, progress_bar=cfg.progress_bar
            )
        )
        pipeline = self._pipeline
        self._lora = MultiLora(pipeline.denoiser, pipeline.device, pipeline.dtype)
        self._table = AdapterTable(
            _PipelineAdapters(self._worker, self._lora, cfg.limits.max_lora_rank, self._paths),
            max_loaded=cfg.max_loaded_adapters,
            max_device=cfg.max_device_adapters,
            max_host=cfg.max_host_adapters,
        )
        for spec in cfg.lora_paths:
            name, path = parse_lora_spec(spec)
            self._paths.allow(normalize_path(path))  # the operator's choice, wherever it lies
            self._table.load(path, name=name, pin=True)
        self._ready.set()
        return self

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def pipeline(self) -> LoadedPipeline:
        if self._pipeline is None:
            raise Unavailable("the model is still loading")
        return self._pipeline

    @property
    def lora(self) -> MultiLora:
        """The adapters attached to the denoiser (for introspection; the worker owns them)."""
        if self._lora is None:
            raise Unavailable("the model is still loading")
        return self._lora

    def close(self) -> None:
        """Finish queued work and stop the worker."""
        self._ready.clear()
        self._worker.close()

    # ---- requests -------------------------------------------------------------------------------

    def generate(
        self,
        request: GenerateRequest,
        *,
        cancelled: Callable[[], bool] | None = None,
        deadline: float | None = None,
    ) -> GenerateResult:
        """Run one request. `cancelled` is polled between steps; `deadline` is a time.monotonic() value."""
        return self.generate_many([request], cancelled=cancelled, deadline=deadline)[0]

    def generate_many(
        self,
        requests: list[GenerateRequest],
        *,
        cancelled: Callable[[], bool] | None = None,
        deadline: float | None = None,
    ) -> list[GenerateResult]:
        """Run several requests, queued together so that those of one shape share a denoising batch.

        Raises the first request's error, if any.
        """
        self._reserve(len(requests))
        admissions = [_Admission(next(self._request_ids), request) for request in requests]
        submitted = False
        try:
            for admission in admissions:
                self._admit(admission, _stop_check(cancelled, deadline))
            self._worker.submit_batchables([a.item for a in admissions if a.item is not None])
            submitted = True
            return [self._finish(admission) for admission in admissions]
        finally:
            for admission in admissions:
                item = admission.item
                if submitted and item is not None and not item.future.done():
                    # Not waited for (an earlier request failed): it holds its adapter until it has run.
                    item.future.add_done_callback(lambda future, a=admission: self._close(a, future))
                else:
                    self._close(admission)
            self._unreserve(len(requests))

    def _reserve(self, count: int) -> None:
        """Refuse at once, rather than queue without bound, when --max-queue requests already wait."""
        bound = self.config.max_queue
        with self._outstanding_lock:
            # A full batch may be running besides the waiting ones.
            if bound and self._outstanding + count > bound + self.config.max_batch_size:
                waiting = max(0, self._outstanding - self.config.max_batch_size)
                raise ResourceExhausted(
                    f"the server is at capacity: {waiting} requests are waiting (--max-queue {bound}); retry later"
                )
            self._outstanding += count

    def _unreserve(self, count: int) -> None:
        with self._outstanding_lock:
            self._outstanding -= count

    def _close(self, admission: _Admission, future: Future | None = None) -> None:
        """Release the request's adapter and write its log line."""
        if future is not None:
            exc = future.exception()
            admission.outcome = "OK" if exc is None else _outcome(exc)
        if admission.lease is not None:
            admission.lease.release()
        self._log_request(admission)

    def _admit(self, admission: _Admission, check: Callable[[int], None]) -> None:
        """Validate, fill in defaults and hold the adapter on the device; then the request can queue."""
        request = admission.request
        try:
            admission.plan = plan = self._plan(request)
            if request.lora is not None:
                self._check_scale(request.lora)
                try:
                    lora = request.lora
                    if lora.path:
                        lora = dataclasses.replace(lora, path=self._paths.resolve(lora.path))
                    admission.lease = self._adapters.acquire(lora)
                except OmniError as exc:
                    # The table names its own fields ("path"); in a Generate they sit under lora_request.
                    if exc.field in ("path", "name", "id", "scale"):
                        exc.field = f"lora_request.{exc.field}"
                    raise
                admission.timings.adapter_ms = (time.perf_counter() - admission.arrived) * 1000
            lease = admission.lease
            work = _Work(
                plan=plan,
                adapter_key=lease.entry.internal_name if lease is not None else None,
                scale=lease.scale if lease is not None else 0.0,
                check=check,
                submitted=time.perf_counter(),
                timings=admission.timings,
            )
            admission.item = BatchItem(key=work.batch_key, size=len(plan.seeds), payload=work)
        except BaseException as exc:
            admission.outcome = _outcome(exc)
            raise

    def _finish(self, admission: _Admission) -> GenerateResult:
        """Wait for the request's images and encode them."""
        request, plan, timings = admission.request, admission.plan, admission.timings
        assert admission.item is not None and plan is not None
        try:
            done: _Done = admission.item.future.result()
            admission.batch_images = done.batch_images
            images = [
                GeneratedImage(image=img, seed=seed, array=arr)
                for img, arr, seed in zip(done.images, done.arrays, plan.seeds, strict=True)
            ]
            if request.output_format is not None:
                encoding = time.perf_counter()
                for image in images:
                    image.data = encode_image(image.image, request.output_format)
                    image.mime_type = request.output_format.mime_type
                timings.encode_ms = (time.perf_counter() - encoding) * 1000
        except BaseException as exc:
            admission.outcome = _outcome(exc)
            raise
        timings.total_ms = (time.perf_counter() - admission.arrived) * 1000
        admission.outcome = "OK"
        applied = None
        if admission.lease is not None:
            entry = admission.lease.entry
            applied = AppliedAdapter(id=entry.id, name=entry.name, path=entry.path, scale=admission.lease.scale)
        return GenerateResult(
            images=images,
            adapter=applied,
            timings=timings,
            num_inference_steps=plan.steps,
            guidance_scale=plan.guidance_scale,
            batch_size=admission.batch_images,
            model=self.pipeline.model_name,
        )

    def load_adapter(
        self, path: str, *, name: str | None = None, adapter_id: int | None = None, pin: bool = False
    ) -> tuple[AdapterInfo, bool]:
        return self._adapters.load(self._paths.resolve(path), name=name, adapter_id=adapter_id, pin=pin)

    def unload_adapter(
        self, *, adapter_id: int | None = None, name: str | None = None, path: str | None = None
    ) -> AdapterInfo:
        if adapter_id is None and not name and not path:
            raise InvalidArgument("give the id, name or path of the adapter to unload")
        return self._adapters.unload(adapter_id=adapter_id, name=name, path=path)

    def list_adapters(self) -> list[AdapterInfo]:
        return self._adapters.list()

    def tier_counts(self) -> dict[str, int]:
        """Adapters per tier ("device", "host", "disk")."""
        return self._adapters.tier_counts()

    # ---- internals ------------------------------------------------------------------------------

    @property
    def _adapters(self) -> AdapterTable:
        self._require_ready()
        assert self._table is not None  # set before ready
        return self._table

    def _require_ready(self) -> None:
        if not self.ready:
            raise Unavailable("the model is still loading; retry when the health check reports SERVING")

    def _plan(self, request: GenerateRequest) -> _Plan:
        self._require_ready()
        pipeline = self.pipeline
        limits = self.config.limits
        s = request.sampling
        if not request.prompt.strip():
            raise InvalidArgument("prompt must not be empty", field="prompt")
        for field_name, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
            if len(text) > limits.max_prompt_chars:
                raise InvalidArgument(
                    f"{field_name} has {len(text)} characters; the limit is {limits.max_prompt_chars}",
                    field=field_name,
                )
        height = pipeline.default_height if s.height is None else s.height
        width = pipeline.default_width if s.width is None else s.width
        multiple = pipeline.spatial_multiple
        max_side = min(limits.max_side, pipeline.max_side or limits.max_side)
        for field_name, value in (("height", height), ("width", width)):
            if value < multiple or value > max_side or value % multiple:
                raise InvalidArgument(
                    f"sampling_params.{field_name} must be a multiple of {multiple} between {multiple} and "
                    f"{max_side} for this model, got {value}",
                    field=f"sampling_params.{field_name}",
                )
        if height * width > limits.max_pixels:
            raise InvalidArgument(
                f"sampling_params.height x width = {height * width} pixels exceeds the limit of {limits.max_pixels}",
                field="sampling_params.height",
            )
        steps = pipeline.default_steps if s.num_inference_steps is None else s.num_inference_steps
        if not 1 <= steps <= limits.max_steps:
            raise InvalidArgument(
                f"sampling_params.num_inference_steps must be between 1 and {limits.max_steps}, got {steps}",
                field="sampling_params.num_inference_steps",
            )
        guidance = pipeline.default_guidance if s.guidance_scale is None else float(s.guidance_scale)
        if not math.isfinite(guidance) or not 0 <= guidance <= limits.max_guidance_scale:
            raise InvalidArgument(
                f"sampling_params.guidance_scale must be between 0 and {limits.max_guidance_scale}, got {guidance}",
                field="sampling_params.guidance_scale",
            )
        if not 1 <= s.num_images <= limits.max_images:
            raise InvalidArgument(
                f"sampling_params.num_images must be between 1 and {limits.max_images}, got {s.num_images}",
                field="sampling_params.num_images",
            )
        seed = secrets.randbits(63) if s.seed is None else s.seed
        if not 0 <= seed <= MAX_SEED - (s.num_images - 1):
            raise InvalidArgument(
                f"sampling_params.seed must be between 0 and 2^64-1 - (num_images-1), got {seed}",
                field="sampling_params.seed",
            )
        return _Plan(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            height=height,
            width=width,
            steps=steps,
            guidance_scale=guidance,
            seeds=[seed + i for i in range(s.num_images)],
        )

    def _check_scale(self, lora: LoraRequest) -> None:
        bound = self.config.limits.max_lora_scale
        if not math.isfinite(lora.scale) or abs(lora.scale) > bound:
            raise InvalidArgument(
                f"lora_request.scale must be a finite number between -{bound:g} and {bound:g}, got {lora.scale}",
                field="lora_request.scale",
            )

    def _run_batch(self, items: list[BatchItem]) -> None:
        """The worker's part: one pipeline call for every request of the batch, each with its adapter."""
        started = time.perf_counter()
        live: list[BatchItem] = []
        for item in items:
            work: _Work = item.payload
            work.timings.queue_ms = (started - work.submitted) * 1000
            if _settle_if_stopped(item, -1):
                continue
            live.append(item)
        if not live:
            return
        try:
            self._run_together(live, started)
            return
        except _AllStopped:
            return
        except Exception as exc:
            log.warning("a batch of %d requests failed (%s: %s)", len(live), type(exc).__name__, exc, exc_info=True)
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

    def _run_together(self, live: list[BatchItem], started: float) -> None:
        """One pipeline call for `live`; fills each request's future."""
        samples: list[tuple[str | None, float]] = []
        prompts: list[str] = []
        negatives: list[str] = []
        seeds: list[int] = []
        guidance: list[float] = []
        for item in live:
            work = item.payload
            n = len(work.plan.seeds)
            samples += [(work.adapter_key, work.scale)] * n
            prompts += [work.plan.prompt] * n
            negatives += [work.plan.negative_prompt] * n
            seeds += work.plan.seeds
            guidance += [work.plan.guidance_scale] * n
        used_guidance = guidance[0]

        def on_step(step: int) -> None:
            # A stopped request is answered at once; the others go on. Stop when none is left.
            stopped = [_settle_if_stopped(item, step) for item in live]  # every one, no short-circuit
            if all(stopped):
                raise _AllStopped

        assert self._lora is not None  # set by start(), before any request is admitted
        pipeline = self.pipeline
        with self._lora.plan(samples):
            plan_ms = (time.perf_counter() - started) * 1000
            if used_guidance > 1:
                pipeline.guidance.set(guidance, used_guidance)
            denoise_start = time.perf_counter()
            try:
                output = run_pipeline(
                    pipeline,
                    prompts=prompts,
                    negative_prompts=negatives,
                    height=live[0].payload.plan.height,
                    width=live[0].payload.plan.width,
                    steps=live[0].payload.plan.steps,
                    guidance_scale=used_guidance,
                    seeds=seeds,
                    on_step=on_step,
                )
            finally:
                pipeline.guidance.clear()
            inference_ms = (time.perf_counter() - denoise_start) * 1000
        offset = 0
        for item in live:
            work = item.payload
            n = len(work.plan.seeds)
            work.timings.adapter_ms += plan_ms
            work.timings.inference_ms = inference_ms
            if not item.future.done():
                item.future.set_result(
                    _Done(output.images[offset : offset + n], output.arrays[offset : offset + n], len(seeds))
                )
            offset += n

    def _log_request(self, admission: _Admission) -> None:
        request, plan, lease = admission.request, admission.plan, admission.lease
        if lease is not None:
            adapter = f"{lease.entry.name}#{lease.entry.id}@{lease.scale:g}"
        elif request.lora is not None:
            lora = request.lora
            adapter = lora.name or lora.path or (f"#{lora.id}" if lora.id is not None else "?")
        else:
            adapter = "-"
        # A request refused by validation has no plan.
        shape = (
            f"size={plan.width}x{plan.height} steps={plan.steps} images={len(plan.seeds)}"
            if plan is not None
            else "size=? steps=? images=?"
        )
        outcome = admission.outcome
        timings = admission.timings
        level = logging.INFO if outcome in ("OK", "CANCELLED", "NOT_RUN") else logging.WARNING
        log.log(
            level,
            "generate id=%d adapter=%s %s batch=%d outcome=%s queue_ms=%.1f adapter_ms=%.1f inference_ms=%.1f "
            "encode_ms=%.1f total_ms=%.1f",
            admission.request_id,
            adapter,
            shape,
            admission.batch_images,
            outcome,
            timings.queue_ms,
            timings.adapter_ms,
            timings.inference_ms,
            timings.encode_ms,
            (time.perf_counter() - admission.arrived) * 1000,
        )


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

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
    import torch

    gc.collect()  # frames and tensors caught in reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _stop_check(cancelled: Callable[[], bool] | None, deadline: float | None) -> Callable[[int], None]:
    """A per-step check that stops the denoising once the client has gone or its deadline passed."""

    def check(step: int) -> None:
        # The deadline first: gRPC also cancels a call whose deadline passed, and the log should say why.
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded(f"deadline exceeded after {step + 1} denoising steps")
        if cancelled is not None and cancelled():
            raise Cancelled(f"request cancelled by the client after {step + 1} denoising steps")

    return check
