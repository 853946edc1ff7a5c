"""The real server under concurrent load: bad adapter loads amid good requests, and 10 adapters through 2 slots."""

from __future__ import annotations

import io
import json
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image

from omni_grpc.bench.fixtures import write_adapter
from omni_grpc.tiny_models.sd3 import TinySD3Spec
from omni_grpc.v1 import omni_pb2 as pb
from tests.helpers import Server, start_server

SPEC = TinySD3Spec()
TIMEOUT = 60.0
PROMPT = "under load"
StatusCode = grpc.StatusCode


def generate_request(lora: pb.LoraRequest | None = None, *, seed: int = 1) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=PROMPT,
        sampling_params=pb.SamplingParams(height=64, width=64, num_inference_steps=2, seed=seed),
        lora_request=lora,
    )


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def status_of(method: Callable[..., object], request: object) -> StatusCode:
    try:
        method(request, timeout=TIMEOUT)
    except grpc.RpcError as exc:
        return exc.code()
    return StatusCode.OK


# ---- servers ------------------------------------------------------------------------------------------


@dataclass
class Servers:
    bad: Server  # default table size; its --lora-dirs holds one good adapter and the bad ones
    bad_dir: Path
    small: Server  # --max-loaded-adapters 3 with "pre" pinned: two slots for the rest
    small_dir: Path


@pytest.fixture(scope="module")
def servers(cache_root: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    # model_dir first: the model is built once here, not by both servers at once.
    assert model_dir.is_dir()
    bad_dir = tmp_path_factory.mktemp("load-bad")
    write_adapter(bad_dir / "good", SPEC, rank=4, seed=1)
    small_dir = tmp_path_factory.mktemp("load-small")
    pre = write_adapter(small_dir / "pre", SPEC, rank=4, seed=100)
    for i in range(10):
        write_adapter(small_dir / f"a{i:02d}", SPEC, rank=4, seed=200 + i)
    logs = tmp_path_factory.mktemp("load-logs")
    common = ["--cache-dir", str(cache_root)]
    bad = start_server([*common, "--lora-dirs", str(bad_dir)], log_path=logs / "bad.log")
    small = start_server(
        [*common, "--lora-dirs", str(small_dir), "--lora-path", f"pre={pre}", "--max-loaded-adapters", "3"],
        log_path=logs / "small.log",
    )
    try:
        yield Servers(bad, bad_dir, small, small_dir)
    finally:
        codes = (bad.stop(), small.stop())
    assert codes == (0, 0), f"exit codes {codes}\n{bad.log()[-3000:]}\n{small.log()[-3000:]}"


# ---- a) bad loads amid good requests -----------------------------------------------------------------


def make_bad_adapters(root: Path, outside: Path) -> dict[str, tuple[str, StatusCode]]:
    """kind -> (path a client sends, the status the server gives it)."""
    good = root / "good"
    no_config = write_adapter(root / "no_config", SPEC, rank=4, seed=2)
    (no_config / "adapter_config.json").unlink()
    truncated = write_adapter(root / "truncated", SPEC, rank=4, seed=3)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    garbage = write_adapter(root / "garbage", SPEC, rank=4, seed=4)
    (garbage / "adapter_model.safetensors").write_bytes(random.Random(0).randbytes(4096))
    pickled = root / "pickle_only"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    # Never unpickled: the server must refuse the format without opening it.
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00}\x94.")
    rank0 = write_adapter(root / "rank0", SPEC, rank=4, seed=5)
    config = json.loads((rank0 / "adapter_config.json").read_text())
    (rank0 / "adapter_config.json").write_text(json.dumps({**config, "r": 0}))
    elsewhere = write_adapter(outside / "valid_but_outside", SPEC, rank=4, seed=6)
    return {
        "missing": (str(root / "does-not-exist"), StatusCode.NOT_FOUND),
        "no_config": (str(no_config), StatusCode.INVALID_ARGUMENT),
        "truncated": (str(truncated), StatusCode.INVALID_ARGUMENT),
        "garbage": (str(garbage), StatusCode.INVALID_ARGUMENT),
        "outside": (str(elsewhere), StatusCode.PERMISSION_DENIED),
        "pickle_only": (str(pickled), StatusCode.INVALID_ARGUMENT),
        "nul_byte": (f"{good}\x00/x", StatusCode.INVALID_ARGUMENT),
        "rank0": (str(rank0), StatusCode.INVALID_ARGUMENT),
    }


def test_bad_loads_amid_good_generates(servers: Servers, tmp_path: Path) -> None:
    server, root = servers.bad, servers.bad_dir
    bad = make_bad_adapters(root, tmp_path)
    kinds = sorted(bad)
    good_path = str(root / "good")
    stub = server.stub
    bad_results: list[tuple[str, str, StatusCode]] = []
    good_results: list[tuple[int, StatusCode | None]] = []
    lock = threading.Lock()
    remaining = list(range(25))
    bad_done = threading.Event()
    start = threading.Barrier(6)

    def send_bad() -> None:
        start.wait()
        while True:
            with lock:
                if not remaining:
                    return
                i = remaining.pop(0)
            kind = kinds[i % len(kinds)]
            path, _ = bad[kind]
            # Each kind goes by turns through LoadAdapter and as a Generate's adapter path: both must refuse alike.
            if (i // len(kinds)) % 2 == 0:
                request = pb.LoadAdapterRequest(path=path, name=f"bad-{i}")
                rpc, code = "LoadAdapter", status_of(stub.LoadAdapter, request)
            else:
                rpc, code = "Generate", status_of(stub.Generate, generate_request(pb.LoraRequest(path=path)))
            with lock:
                bad_results.append((kind, rpc, code))

    def send_good(worker: int) -> None:
        start.wait()
        n = 0
        while n < 6 or not bad_done.is_set():
            lora = pb.LoraRequest(path=good_path) if (worker + n) % 2 else None
            try:
                response = stub.Generate(generate_request(lora, seed=n), timeout=TIMEOUT)
                code = None if len(response.images) == 1 and response.images[0].data else StatusCode.UNKNOWN
            except grpc.RpcError as exc:
                code = exc.code()
            with lock:
                good_results.append((worker, code))
            n += 1

    with ThreadPoolExecutor(6) as pool:
        good_futures = [pool.submit(send_good, w) for w in range(3)]
        bad_futures = [pool.submit(send_bad) for _ in range(3)]
        for future in bad_futures:
            future.result()
        bad_done.set()
        for future in good_futures:
            future.result()

    print(f"{len(bad_results)} bad loads, {len(good_results)} good Generates meanwhile")
    assert len(bad_results) == 25
    assert {(kind, rpc) for kind, rpc, _ in bad_results} >= {(k, r) for k in kinds for r in ("LoadAdapter", "Generate")}
    wrong = [(kind, rpc, code.name) for kind, rpc, code in bad_results if code != bad[kind][1]]
    assert not wrong, f"bad loads with another status than expected: {wrong}"
    failed = [code for _, code in good_results if code is not None]
    assert not failed, f"good Generates failed: {Counter(c.name for c in failed)}"

    # Still serving, and none of the bad ones made it into the table.
    assert server.health_status() == health_pb2.HealthCheckResponse.SERVING
    assert stub.Generate(generate_request(seed=99), timeout=TIMEOUT).images[0].data
    listed = stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT).adapters
    assert [a.path for a in listed] == [good_path]
    assert not [a.name for a in listed if a.name.startswith("bad-")]


# ---- b) 10 adapters through 2 slots ----------------------------------------------------------------


def test_ten_adapters_through_two_slots_under_load(servers: Servers) -> None:
    server, root = servers.small, servers.small_dir
    stub = server.stub
    adapters = [str(root / f"a{i:02d}") for i in range(10)]
    # At most two requests naming an unpinned adapter run at once: every one of them then finds a slot
    # (held adapters cannot be evicted, so a third would get RESOURCE_EXHAUSTED by design).
    slots = threading.Semaphore(2)
    threads, per_thread = 8, 12
    results: dict[tuple[str, int], list[bytes]] = {}
    batch_sizes: Counter[int] = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def key_for(job: int) -> tuple[str, int]:
        seed = 1 + job % 2
        if job % 2 == 0:
            return adapters[(job // 2) % len(adapters)], seed
        return ("pre" if job % 4 == 1 else ""), seed

    def lora_for(key: str) -> pb.LoraRequest | None:
        if not key:
            return None
        return pb.LoraRequest(name=key) if key == "pre" else pb.LoraRequest(path=key)

    def client(t: int) -> None:
        start.wait()
        for k in range(per_thread):
            job = t + threads * k  # round-robin over the adapters across all threads
            key = key_for(job)
            guard = slots if key[0].startswith("/") else None
            if guard:
                guard.acquire()
            try:
                response = stub.Generate(generate_request(lora_for(key[0]), seed=key[1]), timeout=TIMEOUT)
            except grpc.RpcError as exc:
                with lock:
                    errors.append(f"{key}: {exc.code().name}: {exc.details()}")
                continue
            finally:
                if guard:
                    guard.release()
            with lock:
                results.setdefault(key, []).append(response.images[0].data)
                batch_sizes[response.batch_size] += 1

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(client, t) for t in range(threads)]:
            future.result()

    exhausted = sum("RESOURCE_EXHAUSTED" in e for e in errors)
    print(f"{sum(map(len, results.values()))} Generates, {len(errors)} errors ({exhausted} RESOURCE_EXHAUSTED)")
    print(f"batch sizes seen: {dict(sorted(batch_sizes.items()))}")
    assert not errors, errors
    assert max(batch_sizes) > 1, "no two requests ever shared a batch: not a concurrent load"
    assert {key[0] for key in results} >= set(adapters)

    # The pinned adapter was never evicted or re-read; the others churned through the two free slots.
    listed = {a.name: a for a in stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT).adapters}
    assert listed["pre"].pinned and listed["pre"].loads == 1 and listed["pre"].evictions == 0
    unpinned = [a for name, a in listed.items() if name != "pre"]
    assert len(unpinned) <= 2
    assert all(a.loads >= 2 for a in unpinned), [(a.name, a.loads) for a in unpinned]

    # Each result equals the same request run alone (a batch of one), whatever batch it shared.
    exact = 0
    for key, images in sorted(results.items()):
        alone = stub.Generate(generate_request(lora_for(key[0]), seed=key[1]), timeout=TIMEOUT)
        assert alone.batch_size == 1
        expected = pixels(alone.images[0].data)
        for data in images:
            exact += data == alone.images[0].data
            # Up to float rounding before the uint8 cast: batched matmuls may round differently.
            assert np.abs(pixels(data) - expected).max() <= 1, key
    total = sum(map(len, results.values()))
    print(f"{exact}/{total} byte-identical to the request run alone, the rest within one level per pixel")
    final = {a.name: a for a in stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT).adapters}
    assert final["pre"].loads == 1 and final["pre"].pinned
