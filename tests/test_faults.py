"""Load and faults: a bounded queue, request size limits, cancellation that frees the adapter, and one
request's failure (out of memory) failing that request only."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from omni_grpc.config import EngineConfig
from omni_grpc.engine.engine import Engine
from omni_grpc.engine.types import GenerateRequest, SamplingParams
from omni_grpc.errors import ResourceExhausted
from omni_grpc.v1 import omni_pb2 as pb
from tests.helpers import Server, held_worker, listed, log_field, request_lines, start_server, wait_for, wait_queued
from tests.lora_factory import make_peft_adapter


@pytest.fixture(scope="module")
def tight(cache_root: Path, preloaded: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One request runs, one waits; requests over 2000 bytes are refused by name."""
    srv = start_server(
        [
            "--cache-dir",
            str(cache_root),
            "--lora-path",
            f"pre={preloaded}",
            "--max-batch-size",
            "1",
            "--max-queue",
            "1",
            "--max-request-bytes",
            "2000",
            "--lora-dirs",
            str(tmp_path_factory.getbasetemp()),
        ],
        log_path=tmp_path_factory.mktemp("logs") / "tight.log",
    )
    yield srv
    srv.stop()


def slow(lora: pb.LoraRequest | None = None) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt="p", sampling_params=pb.SamplingParams(height=64, width=64, num_inference_steps=1000), lora_request=lora
    )


def assert_stopped_early(server: Server, since: int, adapter: str, count: int, outcome: str = "CANCELLED") -> None:
    """The `count` requests on `adapter` logged since `since` stopped at a step, long before their 1000."""
    wait_for(lambda: len(request_lines(server.log(), since, f"adapter={adapter}#")) == count)
    for line in request_lines(server.log(), since, f"adapter={adapter}#"):
        assert log_field(line, "outcome") == outcome, line
        assert log_field(line, "steps") == "1000" and int(log_field(line, "steps_done")) < 1000, line


def test_a_full_queue_is_resource_exhausted_at_once(tight: Server) -> None:
    since = len(tight.log())
    running = tight.stub.Generate.future(slow(pb.LoraRequest(name="pre")), timeout=120)
    wait_for(lambda: listed(tight)["pre"].in_use == 1)
    waiting = tight.stub.Generate.future(slow(pb.LoraRequest(name="pre")), timeout=120)
    wait_for(lambda: listed(tight)["pre"].in_use == 2)
    with pytest.raises(grpc.RpcError) as refused:
        tight.stub.Generate(slow(), timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at capacity: 1 requests are waiting (--max-queue 1); retry later" in refused.value.details()
    # At once: refused while both requests ahead of it were still there, not after either finished.
    assert not running.done() and not waiting.done() and listed(tight)["pre"].in_use == 2
    running.cancel()
    waiting.cancel()
    assert_stopped_early(tight, since, "pre", 2)
    wait_for(lambda: listed(tight)["pre"].in_use == 0)
    # Capacity comes back as soon as the queue drains.
    small = pb.GenerateRequest(
        prompt="p", sampling_params=pb.SamplingParams(height=64, width=64, num_inference_steps=1)
    )
    assert tight.stub.Generate(small, timeout=60).images


def test_request_size_limits(tight: Server) -> None:
    over = pb.GenerateRequest(prompt="x" * 3000)
    with pytest.raises(grpc.RpcError) as named:
        tight.stub.Generate(over, timeout=30)
    assert named.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the limit is 2000 (--max-request-bytes)" in named.value.details()
    # Beyond four times the limit gRPC itself refuses the message before it is parsed.
    with pytest.raises(grpc.RpcError) as wall:
        tight.stub.Generate(pb.GenerateRequest(prompt="x" * 9000), timeout=30)
    assert wall.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("stop", ["cancel", "deadline"])
def test_cancel_and_deadline_mid_generation_free_the_adapter(
    tight: Server, model_dir: Path, tmp_path: Path, stop: str
) -> None:
    path = make_peft_adapter(model_dir, tmp_path / f"held_{stop}", rank=2, alpha=2, seed=31)
    lora = pb.LoraRequest(path=str(path))
    since = len(tight.log())
    if stop == "cancel":
        future = tight.stub.Generate.future(slow(lora), timeout=120)
        wait_for(lambda: listed(tight).get(f"held_{stop}") is not None and listed(tight)[f"held_{stop}"].in_use == 1)
        future.cancel()
    else:
        with pytest.raises(grpc.RpcError) as late:
            tight.stub.Generate(slow(lora), timeout=1.0)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_stopped_early(tight, since, f"held_{stop}", 1, "CANCELLED" if stop == "cancel" else "DEADLINE_EXCEEDED")
    wait_for(lambda: listed(tight)[f"held_{stop}"].in_use == 0)
    unloaded = tight.stub.UnloadAdapter(pb.UnloadAdapterRequest(name=f"held_{stop}"), timeout=30)
    assert unloaded.adapter.in_use == 0
    # Detached at once, not "when its last request ends": nothing held it any more.
    line = next(line for line in tight.log().splitlines() if f"adapter unloaded id={unloaded.adapter.id}" in line)
    assert "when its last request ends" not in line


# --- one request's failure is that request's only -------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(cache_root: Path) -> Iterator[Engine]:
    eng = Engine(
        EngineConfig(cache_dir=cache_root, batch_policy="fill", max_batch_size=8, allow_any_lora_path=True)
    ).start()
    yield eng
    eng.close()


def _request(seed: int, images: int = 1) -> GenerateRequest:
    sampling = SamplingParams(height=64, width=64, num_inference_steps=2, seed=seed, num_images=images)
    return GenerateRequest(prompt=f"prompt {seed}", sampling=sampling)


def test_out_of_memory_in_a_batch_fails_only_the_request_that_does_not_fit(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    requests = [_request(1), _request(2, images=2), _request(3)]
    alone = [engine.generate(requests[0]), engine.generate(requests[2])]

    def memory_for_two_samples(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        # What a device with room for 2 samples (1 image with guidance) does with a bigger batch.
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is not None and hidden.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hook = engine.pipeline.denoiser.register_forward_pre_hook(memory_for_two_samples, with_kwargs=True)
    try:
        release = held_worker(engine)
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(engine.generate, r) for r in requests]
            wait_queued(engine, len(requests))
            release.set()
            first, third = futures[0].result(timeout=120), futures[2].result(timeout=120)
            with pytest.raises(ResourceExhausted, match="out of memory for this request; retry with fewer images"):
                futures[1].result(timeout=120)
    finally:
        hook.remove()
    # They met in one batch, which ran out of memory and was split.
    assert "a batch of 3 requests failed (OutOfMemoryError" in caplog.text
    for single, isolated in ((alone[0], first), (alone[1], third)):
        np.testing.assert_array_equal(single.images[0].array, isolated.images[0].array)
    # The engine keeps serving, the request that failed included, once it fits.
    assert len(engine.generate(requests[1]).images) == 2
