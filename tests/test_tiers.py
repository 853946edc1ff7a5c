"""Adapter tiers: device up to a bound, host memory up to a larger one, disk beyond; every move counted."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from omni_grpc.bench.fixtures import write_adapter as write_bench_adapter
from omni_grpc.config import EngineConfig
from omni_grpc.engine.engine import Engine
from omni_grpc.engine.types import AdapterInfo, GenerateRequest, LoraRequest, SamplingParams
from omni_grpc.errors import AlreadyExists, InvalidArgument
from omni_grpc.tiny_models.sd3 import TinySD3Spec
from tests.helpers import write_adapter


@pytest.fixture
def engine(cache_root: Path) -> Iterator[Engine]:
    eng = Engine(
        EngineConfig(
            cache_dir=cache_root,
            max_loaded_adapters=0,
            max_device_adapters=2,
            max_host_adapters=3,
            allow_any_lora_path=True,
        )
    ).start()
    yield eng
    eng.close()


def use(engine: Engine, path: Path | str, **lora) -> None:
    """Admit a request for the adapter and end it (the table's part of a request, without denoising)."""
    engine._adapters.acquire(LoraRequest(path=str(path), **lora)).release()


def table(engine: Engine) -> dict[str, AdapterInfo]:
    return {a.name: a for a in engine.list_adapters()}


def tiers(engine: Engine) -> dict[str, str]:
    return {name: info.tier for name, info in sorted(table(engine).items())}


def image(engine: Engine, name: str | None) -> np.ndarray:
    lora = LoraRequest(name=name) if name else None
    sampling = SamplingParams(height=32, width=32, num_inference_steps=2, seed=3)
    return engine.generate(GenerateRequest(prompt="tiers", sampling=sampling, lora=lora)).images[0].array


def test_lru_moves_down_device_host_disk_and_back(engine: Engine, tmp_path: Path) -> None:
    paths = {name: write_adapter(tmp_path / name, seed) for seed, name in enumerate("abcdef")}
    for name in "abcdef":
        use(engine, paths[name])
    assert tiers(engine) == {"a": "disk", "b": "host", "c": "host", "d": "host", "e": "device", "f": "device"}
    assert engine.tier_counts() == {"device": 2, "host": 3, "disk": 1}
    info = table(engine)
    assert (info["a"].evictions, info["b"].evictions, info["f"].evictions) == (2, 1, 0)
    assert all(i.loads == 1 and i.hits == 0 for i in info.values())

    use(engine, paths["f"])  # on the device: a hit
    use(engine, paths["c"])  # in host memory: a promotion; e (LRU on the device) moves to host
    use(engine, paths["a"])  # on disk: read again; f (LRU on the device) to host, so b (LRU in host) to disk
    info = table(engine)
    assert (info["f"].hits, info["c"].promotions, info["a"].loads) == (1, 1, 2)
    assert tiers(engine) == {"a": "device", "b": "disk", "c": "device", "d": "host", "e": "host", "f": "host"}
    assert engine.lora.resident_bytes() == 5 * info["a"].size_bytes  # 2 on the device + 3 in host memory


def test_results_survive_the_round_trip_through_disk(engine: Engine, tmp_path: Path) -> None:
    paths = [write_adapter(tmp_path / f"r{i}", i) for i in range(7)]
    engine.load_adapter(str(paths[0]))
    first = image(engine, "r0")
    assert np.abs(first - image(engine, None)).mean() > 1e-4
    for path in paths[1:]:
        use(engine, path)
    assert table(engine)["r0"].tier == "disk"
    assert np.array_equal(image(engine, "r0"), first)
    assert table(engine)["r0"].loads == 2


def test_pinned_and_held_adapters_never_move_down(engine: Engine, tmp_path: Path) -> None:
    pinned = write_adapter(tmp_path / "pinned", 100)
    held = write_adapter(tmp_path / "held", 101)
    engine.load_adapter(str(pinned), pin=True)
    lease = engine._adapters.acquire(LoraRequest(path=str(held)))
    try:
        for i in range(12):
            use(engine, write_adapter(tmp_path / f"churn{i}", i))
        info = table(engine)
        assert (info["pinned"].tier, info["pinned"].evictions) == ("device", 0)
        assert (info["held"].tier, info["held"].evictions) == ("device", 0)
    finally:
        lease.release()
    use(engine, write_adapter(tmp_path / "one-more", 999))
    assert table(engine)["held"].tier != "device"  # free again, it is the LRU one now
    assert table(engine)["pinned"].tier == "device"


def resident_bytes(process: psutil.Process) -> int:
    """This process's RSS, of memory in use: garbage collected, and (glibc) the allocator's free pages handed back.

    Without the trim, 64 KiB adapters read, freed and interleaved with the small objects that stay (each adapter's
    metadata) leave freed pages in the heap that RSS still counts: tens of MiB over a thousand reads, noise as
    large as the leak looked for."""
    gc.collect()
    trim = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)
    if trim is not None:
        trim(0)
    return int(process.memory_info().rss)


def test_thousand_adapters_ten_thousand_requests_memory_bounded(
    engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # pytest keeps every captured log record of a test in memory: tens of thousands of tier moves would show.
    caplog.set_level(logging.WARNING, logger="omni_grpc")
    # 64 KiB each (rank 32 on the 8 attention projections): kept by mistake, the thousand would add 62.5 MiB.
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    paths = [
        write_bench_adapter(tmp_path / f"m{i:04d}", TinySD3Spec(), rank=32, seed=i, targets=targets)
        for i in range(1000)
    ]
    # Warm-up, not counted: one adapter of the same size read, used and dropped, so that the allocator and the
    # read path have settled (this process has run other tests) before the first reading.
    warm = write_bench_adapter(tmp_path / "warm", TinySD3Spec(), rank=32, seed=10_000, targets=targets)
    engine.load_adapter(str(warm))
    use(engine, warm, scale=0.5)
    engine.unload_adapter(path=str(warm))
    process = psutil.Process()
    # The reading before any of the thousand is read: whatever a load or a read from disk keeps is counted.
    start_rss = resident_bytes(process)
    for path in paths:
        engine.load_adapter(str(path))
    one = table(engine)["m0000"].size_bytes
    assert one == 64 * 1024
    rng = random.Random(0)
    for _ in range(1000):
        use(engine, rng.choice(paths))
    for _ in range(10_000):
        use(engine, rng.choice(paths), scale=rng.uniform(0.2, 1.5))
    counts = engine.tier_counts()
    assert counts == {"device": 2, "host": 3, "disk": 995}
    assert engine.lora.resident_bytes() == 5 * one
    assert len(engine.lora._slots) == 5
    growth = resident_bytes(process) - start_rss
    print(f"\n1000 adapters, 11000 requests: RSS growth {growth / 2**20:.1f} MiB, resident adapters {counts}")
    # A quarter of what keeping one copy of each of the thousand would cost (every re-read kept: far more).
    limit = len(paths) * one / 4
    assert growth < limit, f"resident memory grew by {growth / 2**20:.1f} MiB (limit {limit / 2**20:.1f} MiB)"
    total = sum(i.use_count for i in engine.list_adapters())
    assert total == 11_000


# ---- files that change on disk, and names ------------------------------------------------------------------------


def push_to_disk(engine: Engine, name: str, tmp_path: Path) -> None:
    for i in range(6):  # 2 on the device + 3 in host memory: six newer adapters put it on disk
        use(engine, write_adapter(tmp_path / f"newer{i}", 200 + i))
    assert table(engine)[name].tier == "disk"


def test_a_file_changed_on_disk_is_read_as_a_new_version(engine: Engine, tmp_path: Path) -> None:
    path = write_adapter(tmp_path / "a", seed=1, rank=2)
    engine.load_adapter(str(path))
    old = image(engine, "a")
    before = table(engine)["a"]
    push_to_disk(engine, "a", tmp_path)
    write_adapter(path, seed=2, rank=4)  # replaced while only its metadata is held
    new = image(engine, "a")
    after = table(engine)["a"]
    assert (before.version, before.rank) == (1, 2)
    # The new file whole, with fresh metadata: as if loaded fresh from another path.
    assert (after.version, after.rank, after.size_bytes, after.loads) == (2, 4, 2 * before.size_bytes, 2)
    twin = write_adapter(tmp_path / "twin", seed=2, rank=4)
    engine.load_adapter(str(twin))
    assert np.array_equal(new, image(engine, "twin")) and not np.array_equal(new, old)
    # Read again unchanged: the same version.
    push_to_disk(engine, "a", tmp_path / "again")
    assert np.array_equal(image(engine, "a"), new) and table(engine)["a"].version == 2


def test_a_file_broken_on_disk_takes_its_adapter_out_of_the_table(engine: Engine, tmp_path: Path) -> None:
    path = write_adapter(tmp_path / "b", seed=1)
    engine.load_adapter(str(path))
    push_to_disk(engine, "b", tmp_path)
    (path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidArgument, match=r"safetensors header of .* bytes exceeds"):
        image(engine, "b")
    assert "b" not in table(engine)  # never served half old and half new; a later fixed file loads afresh
    write_adapter(path, seed=3)
    engine.load_adapter(str(path))
    assert table(engine)["b"].version == 1


def test_load_adapter_of_a_changed_file_reloads_it_and_may_rename(engine: Engine, tmp_path: Path) -> None:
    path = write_adapter(tmp_path / "c", seed=1, rank=2)
    info, _ = engine.load_adapter(str(path))
    old = image(engine, "c")
    write_adapter(path, seed=5, rank=3)
    # A request by path does not re-read an adapter held in memory: the file is read when it is next read.
    assert np.array_equal(image(engine, "c"), old)
    # An admin loading the path again gets the new version at once, and may give it a new name.
    again, newly = engine.load_adapter(str(path), name="renamed")
    assert not newly and (again.id, again.name, again.version, again.rank) == (info.id, "renamed", 2, 3)
    assert "c" not in table(engine) and not np.array_equal(image(engine, "renamed"), old)
    # A request's name is a label: it never renames, and a request naming the path with another name is
    # served by the adapter as registered.
    result = engine.generate(
        GenerateRequest(
            prompt="tiers",
            sampling=SamplingParams(height=32, width=32, num_inference_steps=2, seed=3),
            lora=LoraRequest(path=str(path), name="label"),
        )
    )
    assert result.adapter is not None and (result.adapter.name, result.adapter.id) == ("renamed", info.id)
    with pytest.raises(AlreadyExists, match="an id never changes"):
        engine.load_adapter(str(path), adapter_id=info.id + 1)
