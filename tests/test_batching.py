"""One denoising batch across many adapters: each result equals running that request alone."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from omni_grpc.config import EngineConfig
from omni_grpc.engine.batch_sizer import BatchSizer
from omni_grpc.engine.engine import Engine
from omni_grpc.engine.types import GenerateRequest, GenerateResult, LoraRequest, OutputFormat, SamplingParams
from omni_grpc.engine.worker import BatchItem, Worker
from omni_grpc.errors import Cancelled
from tests.helpers import held_worker, run_together, wait_queued
from tests.lora_factory import make_peft_adapter


@pytest.fixture(scope="module")
def engine(cache_root: Path) -> Iterator[Engine]:
    eng = Engine(
        EngineConfig(cache_dir=cache_root, batch_policy="fill", max_batch_size=8, allow_any_lora_path=True)
    ).start()
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def mild_a(model_dir: Path, adapter_root: Path) -> Path:
    """Adapters of realistic strength: the random tiny model amplifies float noise under huge ones."""
    return make_peft_adapter(model_dir, adapter_root / "mild_a", rank=4, alpha=8, seed=11, magnitude=0.1)


@pytest.fixture(scope="module")
def mild_b(model_dir: Path, adapter_root: Path) -> Path:
    return make_peft_adapter(
        model_dir, adapter_root / "mild_b", rank=2, alpha=2, seed=12, targets=("to_q", "to_v"), magnitude=0.2
    )


def request(
    lora: LoraRequest | None = None, *, seed: int = 1, guidance: float = 7.0, images: int = 1, size: int = 64
) -> GenerateRequest:
    return GenerateRequest(
        prompt=f"prompt {seed}",
        negative_prompt=f"blurry, seed {seed}",  # a different negative prompt per request, in one batch
        sampling=SamplingParams(
            height=size, width=size, num_inference_steps=3, seed=seed, guidance_scale=guidance, num_images=images
        ),
        lora=lora,
    )


def arrays(result: GenerateResult) -> list[np.ndarray]:
    return [image.array for image in result.images]


def test_mixed_adapters_scales_guidance_and_no_adapter_in_one_batch(engine: Engine, mild_a: Path, mild_b: Path) -> None:
    requests = [
        request(LoraRequest(path=str(mild_a), scale=1.0), seed=1),
        request(LoraRequest(path=str(mild_a), scale=0.5), seed=2),  # same adapter, other scale
        request(None, seed=3),  # no adapter beside adapted ones
        request(LoraRequest(path=str(mild_b), scale=1.3), seed=4, guidance=3.0),  # other guidance
        request(LoraRequest(path=str(mild_b), scale=-0.7), seed=5, images=2),
    ]
    alone = [engine.generate(r) for r in requests]
    assert all(r.batch_size == len(r.images) for r in alone)
    together = [f.result() for f in run_together(engine, requests)]
    assert [r.batch_size for r in together] == [6] * 5
    for single, batched in zip(alone, together, strict=True):
        assert [i.seed for i in single.images] == [i.seed for i in batched.images]
        for a, b in zip(arrays(single), arrays(batched), strict=True):
            np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)
    # The comparison is not vacuous: the scales and adapters really change the images.
    assert np.abs(arrays(together[0])[0] - arrays(engine.generate(request(None, seed=1)))[0]).mean() > 1e-3


def test_other_shapes_do_not_share_a_batch(engine: Engine) -> None:
    requests = [request(seed=1), request(seed=2, size=32), request(seed=3), request(seed=4, guidance=1.0)]
    results = [f.result() for f in run_together(engine, requests)]
    assert [r.batch_size for r in results] == [2, 1, 2, 1]


def test_with_and_without_negative_prompt_do_not_share_a_batch(engine: Engine) -> None:
    """SDXL encodes "no negative prompt" as zeros for a whole batch, so the two kinds run apart."""
    plain = request(seed=5)
    plain.negative_prompt = ""
    results = [f.result() for f in run_together(engine, [request(seed=4), plain, request(seed=6)])]
    assert [r.batch_size for r in results] == [2, 1, 2]


def test_max_batch_size_splits_the_queue(cache_root: Path) -> None:
    eng = Engine(
        EngineConfig(cache_dir=cache_root, batch_policy="fill", max_batch_size=2, allow_any_lora_path=True)
    ).start()
    try:
        results = [f.result() for f in run_together(eng, [request(seed=s) for s in range(5)])]
        assert sorted(r.batch_size for r in results) == [1, 2, 2, 2, 2]
    finally:
        eng.close()


def test_a_cancelled_request_leaves_its_batch_mates_alone(engine: Engine, mild_a: Path) -> None:
    calls = {"n": 0}

    def cancel_after_two_checks() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    good = request(LoraRequest(path=str(mild_a)), seed=8)
    expected = arrays(engine.generate(good))
    release = held_worker(engine)
    pool = ThreadPoolExecutor(2)
    # The survivor queues first, so the doomed request is not the first one the step check looks at.
    survivor = pool.submit(engine.generate, good)
    wait_queued(engine, 1)
    doomed = pool.submit(engine.generate, request(seed=9), cancelled=cancel_after_two_checks)
    wait_queued(engine, 2)
    release.set()
    with pytest.raises(Cancelled, match="after 2 denoising steps"):
        doomed.result()
    result = survivor.result()
    assert result.batch_size == 2
    np.testing.assert_allclose(arrays(result)[0], expected[0], atol=1e-4, rtol=0)


# ---- the scheduling policy itself -----------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.on_batch: Callable[[], None] | None = None

    def __call__(self, items: list[BatchItem[str]]) -> None:
        self.gate.wait()
        self.batches.append([item.payload for item in items])
        if self.on_batch is not None:
            self.on_batch()
        for item in items:
            item.future.set_result(None)


def item(key: str, name: str, size: int = 1) -> BatchItem[str]:
    return BatchItem(key=key, size=size, payload=name)


def worker_with(recorder: Recorder, max_batch_size: int) -> Worker[str]:
    worker: Worker[str] = Worker(max_batch_size=max_batch_size)
    worker.start_batching(recorder)
    return worker


def submit(worker: Worker[str], job: BatchItem[str]) -> Future:
    worker.submit_batchables([job])
    return job.future


def test_a_lone_request_runs_alone_at_once() -> None:
    recorder = Recorder()
    worker = worker_with(recorder, max_batch_size=8)
    submit(worker, item("x", "first")).result()
    submit(worker, item("x", "second")).result()
    assert recorder.batches == [["first"], ["second"]]
    worker.close()


def test_oldest_first_no_starvation_and_size_bound() -> None:
    recorder = Recorder()
    worker = worker_with(recorder, max_batch_size=3)
    hold = threading.Event()
    worker.submit(hold.wait)
    futures = [
        submit(worker, i)
        for i in (item("x", "x1"), item("y", "y1"), item("x", "x2", size=2), item("x", "x3"), item("x", "x4"))
    ]

    def more_x() -> None:  # a stream of x keeps arriving while x batches run
        if len(recorder.batches) == 1:
            futures.append(submit(worker, item("x", "x5")))

    recorder.on_batch = more_x
    hold.set()
    for f in list(futures):
        f.result()
    for f in futures:
        f.result()
    # x1 heads the queue and takes x2 (size 2) up to the bound; y1 is next in line, before x3, x4, x5.
    assert recorder.batches == [["x1", "x2"], ["y1"], ["x3", "x4", "x5"]]
    worker.close()


def test_a_learned_batch_size_keeps_the_queue_in_order() -> None:
    """Where batching does not pay, batches are smaller, and the oldest request still goes first."""
    sizer = BatchSizer(8)
    for seconds in (9.0, 1.0, 1.0):  # a warm-up call, then single calls of 1 s
        sizer.observe("x", 1, seconds)
    sizer.observe("x", 3, 3.5)  # three together cost more than three alone
    recorder = Recorder()
    worker: Worker[str] = Worker(sizer=sizer)
    worker.start_batching(recorder)
    hold = threading.Event()
    worker.submit(hold.wait)
    futures = [submit(worker, i) for i in (item("x", "x1"), item("x", "x2"), item("y", "y1"), item("x", "x3"))]
    hold.set()
    for f in futures:
        f.result()
    assert recorder.batches == [["x1"], ["x2"], ["y1"], ["x3"]]
    worker.close()


def test_the_engine_learns_batch_costs_from_its_own_runs(cache_root: Path) -> None:
    eng = Engine(EngineConfig(cache_dir=cache_root, max_batch_size=4, allow_any_lora_path=True)).start()
    try:
        batch = [request(seed=s) for s in range(3)]
        for _ in range(2):  # the shape's first call warms it up; the second is its first cost
            together = [f.result() for f in run_together(eng, batch)]
            assert [r.batch_size for r in together] == [3, 3, 3]
        learned = eng.sizer.learned()
        assert len(learned) == 1
        ((key, costs),) = learned.items()
        assert list(costs) == [3] and 0 < costs[3] < 60
        # Calls of one sample that cost a quarter of three together: batching does not pay here, so it stops.
        for _ in range(5):
            eng.sizer.observe(key, 1, costs[3] / 4)
        alone = [f.result() for f in run_together(eng, batch)]
        assert [r.batch_size for r in alone] == [1, 1, 1]
        for a, b in zip(alone, together, strict=True):
            np.testing.assert_allclose(arrays(a)[0], arrays(b)[0], atol=1e-4)
    finally:
        eng.close()


def test_the_denoiser_does_not_wait_for_encoding(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request's PNG is encoded on its caller's thread: the next batch denoises meanwhile."""
    from omni_grpc.engine import engine as engine_module

    real = engine_module.encode_image
    encoding, go_on = threading.Event(), threading.Event()

    def slow_for_the_first(image: Any, fmt: OutputFormat) -> bytes:
        if not encoding.is_set():
            encoding.set()
            assert go_on.wait(60), "the second request never finished while the first was encoding"
        return real(image, fmt)

    monkeypatch.setattr(engine_module, "encode_image", slow_for_the_first)
    first = dataclasses.replace(request(seed=31), output_format=OutputFormat.PNG)
    second = dataclasses.replace(request(seed=32), output_format=OutputFormat.PNG)
    with ThreadPoolExecutor(2) as pool:
        pending = pool.submit(engine.generate, first)
        assert encoding.wait(60)
        done = engine.generate(second)  # denoised and encoded while the first still encodes
        assert not pending.done()
        go_on.set()
        assert pending.result().images[0].data[:8] == b"\x89PNG\r\n\x1a\n"
    assert done.images[0].data[:8] == b"\x89PNG\r\n\x1a\n"
