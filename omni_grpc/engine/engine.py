"""The engine: the pipeline, the adapter table and the worker, behind a blocking, thread-safe API.

It knows nothing of gRPC. The servicer, the offline `Omni` API and the example scripts all call it.
This module is the public API and admission (validate, hold the adapter, queue, wait, encode, log);
what runs on the worker thread is in `batch_runner`, the checks and defaults in `validation`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from omni_grpc.config import EngineConfig
from omni_grpc.engine.adapter_backend import LoadingBudget, PipelineAdapters
from omni_grpc.engine.adapters import AdapterLease, AdapterTable, normalize_path, parse_lora_spec
from omni_grpc.engine.batch_runner import BatchRunner, Done, StopCheck, Work, stop_check
from omni_grpc.engine.batch_sizer import BatchSizer
from omni_grpc.engine.imaging import encode_image, encode_mp4
from omni_grpc.engine.lora_set import LoraSet
from omni_grpc.engine.observe import EngineState, Observer, RequestRecord
from omni_grpc.engine.path_policy import PathPolicy
from omni_grpc.engine.pipeline import LoadedPipeline, load_pipeline
from omni_grpc.engine.progress import Progress, ProgressEvent, Queued, Started
from omni_grpc.engine.types import (
    AdapterInfo,
    AppliedAdapter,
    GeneratedImage,
    GeneratedVideo,
    GenerateRequest,
    GenerateResult,
    LoraRequest,
    OutputFormat,
    Timings,
)
from omni_grpc.engine.validation import ValidRequest, requested_adapters, resolve_expert, validate_request
from omni_grpc.engine.worker import BatchItem, Worker
from omni_grpc.errors import InvalidArgument, OmniError, ResourceExhausted, Unavailable
from omni_grpc.quoting import CUT_MARK, loggable

log = logging.getLogger("omni_grpc.requests")


@dataclass
class _Admission:
    """One request from arrival to its log line."""

    request_id: int
    request: GenerateRequest
    arrived: float = field(default_factory=time.perf_counter)
    timings: Timings = field(default_factory=Timings)
    valid: ValidRequest | None = None
    # The adapters it asked for, each with the field that names it, and those it holds (in that order).
    requested: list[tuple[str, LoraRequest]] = field(default_factory=list)
    leases: list[AdapterLease] = field(default_factory=list)
    item: BatchItem[Work] | None = None
    # NOT_RUN until it succeeds or fails (a batch mate's error can stop it from being waited for).
    outcome: str = "NOT_RUN"
    batch_images: int = 0
    progress: Progress | None = None
    # The adapters it runs with, as its reply names them.
    applied: list[AppliedAdapter] = field(default_factory=list)


@contextlib.contextmanager
def _paths_as_sent(real: str | None, sent: str | None) -> Iterator[None]:
    """Errors about a client's adapter name it as the client did: the real path it resolved to (which can
    reveal the server's folders, e.g. the root a relative path landed in) is not the client's to see."""
    try:
        yield
    except OmniError as exc:
        if real and sent and real != sent:
            exc.message = conceal_path(exc.message, real, sent)
        raise


def conceal_path(message: str, real: str, sent: str) -> str:
    """`message` with the server's part of `real` (what `sent` resolved to) put back as the client sent it,
    however a message quotes it: raw, escaped by repr (either quote), or cut short inside it."""
    common = 0
    while common < min(len(real), len(sent)) and real[-1 - common] == sent[-1 - common]:
        common += 1
    real_head, sent_head = real[: len(real) - common], sent[: len(sent) - common]
    if not real_head:
        return message
    for form in (str, _escaped_single, _escaped_double):
        hidden, shown_as = form(real_head), form(sent_head)
        message = message.replace(hidden, shown_as)
        # A quote cut short inside the head ends in "...(cut)": drop the head's start there.
        for size in range(len(hidden) - 1, 0, -1):
            message = message.replace(hidden[:size] + CUT_MARK, CUT_MARK)
    return message


def _escaped_single(text: str) -> str:
    """`text` as repr escapes it inside single quotes (a value holding both kinds of quote)."""
    return repr("'\"" + text)[4:-1]


def _escaped_double(text: str) -> str:
    """`text` as repr escapes it inside double quotes (a value holding a single quote only)."""
    return repr("'" + text)[2:-1] if '"' not in text else text


def _with_adapters(progress: Progress | None, applied: list[AppliedAdapter]) -> Progress | None:
    """The request's listener, told at the start which adapters it runs with (the worker knows only the batch)."""
    if progress is None:
        return None
    sink = progress.sink

    def tell(event: ProgressEvent) -> None:
        sink(dataclasses.replace(event, adapters=list(applied)) if isinstance(event, Started) else event)

    return dataclasses.replace(progress, sink=tell)


def _adapter_names(admissions: list[_Admission]) -> list[str]:
    return sorted({lease.entry.name for admission in admissions for lease in admission.leases})


def _outcome(exc: BaseException) -> str:
    """The log's name for how a request failed: its gRPC status name."""
    return exc.code if isinstance(exc, OmniError) else "INTERNAL"


class Engine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.sizer = BatchSizer(self.config.max_batch_size, policy=self.config.batch_policy)
        self._worker: Worker[Work] = Worker(max_running_batches=self.config.max_running_batches, sizer=self.sizer)
        self._pipeline: LoadedPipeline | None = None
        self._table: AdapterTable | None = None
        self._lora: LoraSet | None = None
        self._ready = threading.Event()
        self._request_ids = itertools.count(1)
        self._paths = PathPolicy(self.config.lora_dirs, allow_any=self.config.allow_any_lora_path)
        # Generate requests inside the engine (waiting or running), for the --max-queue bound.
        self._outstanding = 0
        self._outstanding_lock = threading.Lock()
        # Those queued or running, by request id (for `state`).
        self._active: dict[int, _Admission] = {}
        # Told of every request as it ends and every batch as it runs (the server's metrics).
        self.observers: list[Observer] = []

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Engine:
        """Load the model (on the worker) and the pre-loaded adapters. Blocking; raises ModelLoadError."""
        cfg = self.config
        if cfg.torch_threads:
            import torch

            torch.set_num_threads(cfg.torch_threads)
            log.info("torch uses %d CPU threads (--torch-threads)", cfg.torch_threads)
        self._pipeline = pipeline = self._worker.call(
            lambda: load_pipeline(
                cfg.model,
                device=cfg.device,
                dtype=cfg.dtype,
                cache_dir=cfg.cache_dir,
                progress_bar=cfg.progress_bar,
                served_name=cfg.served_model_name,
            )
        )
        self._lora = LoraSet(
            pipeline.lora_parts, pipeline.denoiser_component, pipeline.kohya_table, pipeline.device, pipeline.dtype
        )
        self._worker.start_batching(
            BatchRunner(pipeline, self._lora, self._worker.turns, on_batch=self._batch_done, sizer=self.sizer)
        )
        self._table = AdapterTable(
            PipelineAdapters(
                self._worker, self._lora, cfg.limits.max_lora_rank, self._paths, LoadingBudget(cfg.max_loading_bytes)
            ),
            max_loaded=cfg.max_loaded_adapters,
            max_device=cfg.max_device_adapters,
            max_host=cfg.max_host_adapters,
            reserve_admin_adapters=cfg.reserve_admin_adapters,
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
    def lora(self) -> LoraSet:
        """The adapters attached to the pipeline (for introspection; the worker owns them)."""
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
        progress: Progress | None = None,
    ) -> GenerateResult:
        """Run one request. `cancelled` is polled between steps; `deadline` is a time.monotonic() value;
        `progress` is told the request's place in the queue, its start, its steps and previews."""
        return self.generate_many([request], cancelled=cancelled, deadline=deadline, progress=[progress])[0]

    def generate_many(
        self,
        requests: list[GenerateRequest],
        *,
        cancelled: Callable[[], bool] | None = None,
        deadline: float | None = None,
        progress: list[Progress | None] | None = None,
    ) -> list[GenerateResult]:
        """Run several requests, queued together so that those of one shape share a denoising batch
        (`progress`: each one's listener, if any).

        Raises the first request's error, if any.
        """
        self._reserve(len(requests))
        listeners = progress or [None] * len(requests)
        admissions = [
            _Admission(next(self._request_ids), request, progress=listener)
            for request, listener in zip(requests, listeners, strict=True)
        ]
        submitted = False
        try:
            for admission in admissions:
                self._admit(admission, stop_check(cancelled, deadline))
            self._worker.submit_batchables([a.item for a in admissions if a.item is not None])
            submitted = True
            return [self._finish(admission) for admission in admissions]
        finally:
            for admission in admissions:
                item = admission.item
                if submitted and item is not None and not item.future.done():
                    # Not waited for (an earlier request failed): it holds its adapter until it has run.
                    item.future.add_done_callback(functools.partial(self._close, admission))
                else:
                    self._close(admission)
            self._unreserve(len(requests))

    def load_adapter(
        self,
        path: str,
        *,
        name: str | None = None,
        adapter_id: int | None = None,
        pin: bool = False,
        expert: str | None = None,
    ) -> tuple[AdapterInfo, bool]:
        into = resolve_expert(expert, self._experts) or ""
        real = self._paths.resolve(path)
        with _paths_as_sent(real, path):
            return self._adapters.load(real, name=name, adapter_id=adapter_id, pin=pin, expert=into)

    def unload_adapter(
        self,
        *,
        adapter_id: int | None = None,
        name: str | None = None,
        path: str | None = None,
        expert: str | None = None,
    ) -> AdapterInfo:
        if adapter_id is None and not name and not path:
            raise InvalidArgument("give the id, name or path of the adapter to unload")
        into = resolve_expert(expert, self._experts) or ""
        return self._adapters.unload(adapter_id=adapter_id, name=name, path=path, expert=into)

    def list_adapters(self) -> list[AdapterInfo]:
        return self._adapters.list()

    def tier_counts(self) -> dict[str, int]:
        """Adapters per tier ("device", "host", "disk")."""
        return self._adapters.tier_counts()

    def state(self) -> EngineState:
        """Requests running and waiting, and the adapters they hold; adapters per tier and their moves."""
        with self._outstanding_lock:  # only admissions with a queued item are in _active
            active = list(self._active.values())
        running = [a for a in active if a.item is not None and a.item.started]
        waiting = [a for a in active if a not in running]
        ready = self.ready
        return EngineState(
            running=len(running),
            waiting=len(waiting),
            tiers=self._adapters.tier_counts() if ready else {},
            adapter_totals=self._adapters.totals() if ready else {},
            running_adapters=_adapter_names(running),
            waiting_adapters=_adapter_names(waiting),
            max_device_adapters=self.config.max_device_adapters,
        )

    def _batch_done(self, images: int) -> None:
        self._notify(lambda observer: observer.batch_done(images))

    def _notify(self, tell: Callable[[Observer], None]) -> None:
        for observer in self.observers:
            try:
                tell(observer)
            except Exception:  # an observer's failure is no request's
                log.exception("an engine observer failed")

    # ---- admission ------------------------------------------------------------------------------

    @property
    def _experts(self) -> tuple[str, ...]:
        return self.pipeline.capabilities.experts

    @property
    def _adapters(self) -> AdapterTable:
        self._require_ready()
        assert self._table is not None  # set before ready
        return self._table

    def _require_ready(self) -> None:
        if not self.ready:
            raise Unavailable("the model is still loading; retry when the health check reports SERVING")

    def _reserve(self, count: int) -> None:
        """Refuse at once, rather than queue without bound, when --max-queue requests already wait."""
        bound = self.config.max_queue
        with self._outstanding_lock:
            # A full batch may be running besides the waiting ones.
            if bound and self._outstanding + count > bound + self.config.max_batch_size:
                raise ResourceExhausted(
                    f"the server is at capacity: {self._worker.queued} requests are waiting (--max-queue {bound}); "
                    "retry later"
                )
            self._outstanding += count

    def _unreserve(self, count: int) -> None:
        with self._outstanding_lock:
            self._outstanding -= count

    def _admit(self, admission: _Admission, check: StopCheck) -> None:
        """Validate, fill in defaults and hold the adapters on the device; then the request can queue."""
        request = admission.request
        try:
            self._require_ready()
            admission.valid = valid = validate_request(request, self.pipeline, self.config.limits)
            admission.requested = requested_adapters(request, self.config.limits, self._experts)
            for field_name, lora in admission.requested:
                lease = self._hold(field_name, lora)
                admission.leases.append(lease)
                earlier = next((i for i, held in enumerate(admission.leases[:-1]) if held.entry is lease.entry), None)
                if earlier is not None:
                    raise InvalidArgument(
                        f"{field_name} names the same adapter as {admission.requested[earlier][0]} "
                        f"('{lease.entry.name}'); give each adapter once, with the scale it should have",
                        field=field_name,
                    )
            if admission.leases:
                admission.timings.adapter_ms = (time.perf_counter() - admission.arrived) * 1000
            # Each named as registered, with the path as this request gave it (none when it named the adapter): a
            # reply shows no server path.
            admission.applied = [
                AppliedAdapter(
                    id=lease.entry.id,
                    name=lease.entry.name,
                    path=lora.path or "",
                    scale=lease.scale,
                    expert=lease.entry.expert,
                )
                for lease, (_, lora) in zip(admission.leases, admission.requested, strict=True)
            ]
            work = Work(
                request=valid,
                adapters=tuple((lease.entry.internal_name, lease.scale) for lease in admission.leases),
                adapter_label=",".join(lease.label for lease in admission.leases),
                check=check,
                submitted=time.perf_counter(),
                timings=admission.timings,
                progress=_with_adapters(admission.progress, admission.applied),
            )
            admission.item = BatchItem(
                key=self.pipeline.family.batch_key(valid), size=len(valid.seeds), payload=work, steps=valid.steps
            )
            if admission.progress is not None:
                sink = admission.progress.sink
                admission.item.on_position = lambda position: sink(Queued(position))
            with self._outstanding_lock:
                self._active[admission.request_id] = admission
        except BaseException as exc:
            admission.outcome = _outcome(exc)
            raise

    def _hold(self, field_name: str, lora: LoraRequest) -> AdapterLease:
        """Find or load one adapter of a request and hold it on the device."""
        try:
            real = self._paths.resolve(lora.path) if lora.path else None
            with _paths_as_sent(real, lora.path):
                return self._adapters.acquire(dataclasses.replace(lora, path=real))
        except OmniError as exc:
            # The table names its own fields ("path"); in a Generate they sit under the request's field.
            if exc.field in ("path", "name", "id", "scale", "expert"):
                exc.field = f"{field_name}.{exc.field}"
            elif exc.field is None or exc.field == "lora_request":
                exc.field = field_name
            raise

    def _finish(self, admission: _Admission) -> GenerateResult:
        """Wait for the request's images and encode them."""
        request, valid, timings = admission.request, admission.valid, admission.timings
        assert admission.item is not None and valid is not None
        try:
            done: Done = admission.item.future.result()
            admission.batch_images = done.batch_images
            images: list[GeneratedImage] = []
            videos: list[GeneratedVideo] = []
            if valid.num_frames:
                videos = [
                    GeneratedVideo(frames=frames, seed=seed, fps=valid.fps, array=arr)
                    for frames, arr, seed in zip(done.images, done.arrays, valid.seeds, strict=True)
                ]
            else:
                images = [
                    GeneratedImage(image=img, seed=seed, array=arr)
                    for img, arr, seed in zip(done.images, done.arrays, valid.seeds, strict=True)
                ]
            if request.output_format is not None:
                encoding = time.perf_counter()
                for image in images:
                    image.data = encode_image(image.image, request.output_format)
                    image.mime_type = request.output_format.mime_type
                for video in videos:
                    video.data, video.mime_type = encode_mp4(video.frames, video.fps), "video/mp4"
                    if valid.return_frames:
                        video.frame_data = [encode_image(frame, OutputFormat.PNG) for frame in video.frames]
                timings.encode_ms = (time.perf_counter() - encoding) * 1000
        except BaseException as exc:
            admission.outcome = _outcome(exc)
            raise
        timings.total_ms = (time.perf_counter() - admission.arrived) * 1000
        admission.outcome = "OK"
        applied = admission.applied
        return GenerateResult(
            images=images,
            videos=videos,
            adapter=applied[0] if len(applied) == 1 else None,
            adapters=applied,
            timings=timings,
            num_inference_steps=valid.steps,
            guidance_scale=valid.guidance_scale,
            batch_size=admission.batch_images,
            model=self.pipeline.model_name,
        )

    def _close(self, admission: _Admission, future: Future[Any] | None = None) -> None:
        """Release the request's adapters and write its log line."""
        if future is not None:
            exc = future.exception()
            admission.outcome = "OK" if exc is None else _outcome(exc)
        for lease in admission.leases:
            lease.release()
        with self._outstanding_lock:
            self._active.pop(admission.request_id, None)
        self._log_request(admission)
        record = RequestRecord(
            outcome=admission.outcome,
            queue_s=admission.timings.queue_ms / 1000,
            inference_s=admission.timings.inference_ms / 1000,
            total_s=time.perf_counter() - admission.arrived,
        )
        self._notify(lambda observer: observer.request_done(record))

    def _log_request(self, admission: _Admission) -> None:
        request, valid = admission.request, admission.valid
        # Those it holds by label; those refused before they named an adapter as the client sent them (escaped,
        # cut short).
        sent = admission.requested or [("", lora) for lora in ([request.lora] if request.lora else request.loras)]
        labels = [lease.label for lease in admission.leases] + [
            loggable(lora.name or lora.path or (f"#{lora.id}" if lora.id is not None else "?"))
            for _, lora in sent[len(admission.leases) :]
        ]
        adapter = ",".join(labels) or "-"
        # A request refused by validation has not been validated.
        steps_done = admission.item.steps_done if admission.item is not None else 0
        outcome = admission.outcome
        timings = admission.timings
        fields: dict[str, object] = {
            "id": admission.request_id,
            "adapter": adapter,
            "size": f"{valid.width}x{valid.height}" if valid is not None else "?",
            "steps": valid.steps if valid is not None else "?",
            "steps_done": steps_done,
            "images": len(valid.seeds) if valid is not None else "?",
            "batch": admission.batch_images,
            "outcome": outcome,
            "queue_ms": round(timings.queue_ms, 1),
            "adapter_ms": round(timings.adapter_ms, 1),
            "inference_ms": round(timings.inference_ms, 1),
            "encode_ms": round(timings.encode_ms, 1),
            "total_ms": round((time.perf_counter() - admission.arrived) * 1000, 1),
        }
        level = logging.INFO if outcome in ("OK", "CANCELLED", "NOT_RUN") else logging.WARNING
        # The text line and, with --log-format json, the same fields as keys of the object.
        log.log(level, "generate %s", " ".join(f"{key}={value}" for key, value in fields.items()), extra=fields)
