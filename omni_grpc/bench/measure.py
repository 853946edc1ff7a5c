"""The seven measurements. Each returns rows of (what, ours, baseline, ratio, goal), measured side by side."""

from __future__ import annotations

import itertools
import shutil
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch.profiler import ProfilerActivity, profile

from omni_grpc.bench.baseline import DiffusersBaseline
from omni_grpc.bench.fixtures import BenchModel, adapter_set, write_adapter, write_lycoris_file
from omni_grpc.config import EngineConfig, ServerConfig
from omni_grpc.engine.engine import Engine
from omni_grpc.engine.types import GenerateRequest, LoraRequest, SamplingParams
from omni_grpc.loopback import running_server
from omni_grpc.v1 import omni_pb2 as pb
from omni_grpc.v1 import omni_pb2_grpc


@dataclass
class Row:
    measurement: str
    ours: float
    baseline: float
    unit: str
    ratio: float
    goal: str
    met: bool | None  # None: a figure shown beside the goals, with none of its own
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        if torch.cuda.is_available():  # a GPU runs behind the Python that launched it
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def mixed_workload(
    model: BenchModel,
    root: Path,
    *,
    requests: int,
    adapters: int,
    clients: int,
    size: int,
    steps: int,
    repeat: int = 3,
) -> Row:
    """N requests over M adapters, varied scales, C clients through the real gRPC server, against plain
    diffusers serving the same requests one at a time: the median of `repeat` runs of each, turn about."""
    paths = adapter_set(root, model, adapters)
    trace = [(paths[i % adapters] if i % 5 else None, 0.5 + 0.25 * (i % 4), i) for i in range(requests)]

    baseline = DiffusersBaseline(model.path, paths, frames=model.frames)
    baseline.generate(adapter=paths[0], scale=1.0, size=size, steps=steps, seed=0)  # warm-up

    def plain() -> None:
        for adapter, scale, seed in trace:
            baseline.generate(adapter=adapter, scale=scale, size=size, steps=steps, seed=seed)

    config = ServerConfig(
        engine=EngineConfig(
            model=str(model.path),
            max_batch_size=clients,
            max_device_adapters=adapters + 1,
            lora_dirs=[str(root)],
        ),
        port=0,
        grace_period=5,
        metrics_port=0,
    )
    base_times, our_times = [], []
    with running_server(config) as server:
        channel = grpc.insecure_channel(server.target)
        stub = omni_pb2_grpc.OmniServiceStub(channel)
        for path in paths:  # the baseline had its adapters loaded up front too
            stub.LoadAdapter(pb.LoadAdapterRequest(path=str(path)))

        def call(item: tuple[Path | None, float, int]) -> None:
            adapter, scale, seed = item
            request = pb.GenerateRequest(
                prompt="a benchmark prompt",
                sampling_params=pb.SamplingParams(
                    height=size, width=size, num_inference_steps=steps, seed=seed, num_frames=model.frames
                ),
            )
            if adapter is not None:
                request.lora_request.CopyFrom(pb.LoraRequest(path=str(adapter), scale=scale))
            stub.Generate(request, timeout=600)

        def ours() -> None:
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(call, trace))

        call(trace[0])  # warm-up
        for _ in range(repeat):  # turn about, so drift on a shared machine hits both alike
            base_times.append(_median_time(plain, 1))
            our_times.append(_median_time(ours, 1))
        channel.close()
    base_rps, ours_rps = requests / statistics.median(base_times), requests / statistics.median(our_times)
    ratio = ours_rps / base_rps
    return Row(
        f"mixed workload, {model.name} model ({size}px{f', {model.frames} frames' if model.frames else ''}, {steps} "
        f"steps): {requests} requests, {adapters} adapters, "
        f"{clients} clients",
        ours_rps,
        base_rps,
        "req/s",
        ratio,
        ">= 1",
        ratio >= 1,
        f"median of {repeat} runs of each, turn about",
    )


def _engine(model: BenchModel, *, max_batch_size: int = 8, max_device_adapters: int = 64) -> Engine:
    config = EngineConfig(
        model=str(model.path),
        allow_any_lora_path=True,
        max_batch_size=max_batch_size,
        max_device_adapters=max_device_adapters,
    )
    return Engine(config).start()


def _request(size: int, steps: int, lora: LoraRequest | None, seed: int = 0) -> GenerateRequest:
    sampling = SamplingParams(height=size, width=size, num_inference_steps=steps, seed=seed)
    return GenerateRequest(prompt="a benchmark prompt", sampling=sampling, lora=lora)


def batch_across_adapters(model: BenchModel, root: Path, *, batch: int, size: int, steps: int, repeat: int) -> Row:
    """A batch of B requests on B different adapters against a batch of B on one adapter."""
    paths = adapter_set(root, model, batch)
    engine = _engine(model, max_batch_size=batch)
    try:
        for path in paths:
            engine.load_adapter(str(path))
        distinct = [_request(size, steps, LoraRequest(path=str(p)), i) for i, p in enumerate(paths)]
        same = [_request(size, steps, LoraRequest(path=str(paths[0])), i) for i in range(batch)]
        # Both warmed up first: a first batch of eight adapters stacks them, once.
        t_same, t_distinct = _interleaved(
            lambda: engine.generate_many(same), lambda: engine.generate_many(distinct), repeat
        )
    finally:
        engine.close()
    ratio = t_same / t_distinct
    return Row(
        f"batch of {batch} on {batch} different adapters vs on one adapter ({model.name}, {size}px)",
        t_distinct,
        t_same,
        "s/batch",
        ratio,
        ">= 0.95",
        ratio >= 0.95,
        "ratio = one-adapter time / different-adapters time",
    )


# Each sample's adapters, by internal key, with their scales (as the batch runner plans them).
Samples = list[list[tuple[str, float]]]


def _steps(engine: Engine, size: int, *plans: Samples | None, batch: int = 1) -> list[Callable[[], None]]:
    """One denoising step (one guided denoiser forward: 2 x `batch` rows) with each of `plans` (None: none)."""
    denoiser = engine.pipeline.denoiser
    cfg: Any = denoiser.config  # a diffusers FrozenDict of the model's settings
    latent = size // engine.pipeline.pipe.vae_scale_factor
    gen = torch.Generator().manual_seed(0)
    rows = 2 * batch
    device, dtype = engine.pipeline.device, engine.pipeline.dtype
    inputs = {
        "hidden_states": torch.randn(rows, cfg.in_channels, latent, latent, generator=gen).to(device, dtype),
        "encoder_hidden_states": torch.randn(rows, 154, cfg.joint_attention_dim, generator=gen).to(device, dtype),
        "pooled_projections": torch.randn(rows, cfg.pooled_projection_dim, generator=gen).to(device, dtype),
        "timestep": torch.full((rows,), 500.0, device=device),
        "return_dict": False,
    }

    def step(samples: Samples | None) -> Callable[[], None]:
        if samples is not None and len(samples) != batch:
            raise ValueError(f"a plan for {len(samples)} samples in a batch of {batch}")
        # One plan for every call, as a batch keeps its plan for all its steps.
        plan = engine.lora.plan_for(samples) if samples is not None else None

        def run() -> None:
            with torch.inference_mode():
                engine.lora.activate(plan)
                try:
                    denoiser(**inputs)
                finally:
                    engine.lora.activate(None)

        return run

    return [step(samples) for samples in plans]


def _one(key: str) -> Samples:
    return [[(key, 1.0)]]


def _interleaved(first: Callable[[], object], second: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median seconds of each, after one call of each, run turn about so drift on a shared machine hits both alike;
    which goes first alternates, so neither always runs on what the other left warm (or cold)."""
    first()
    second()
    a, b = [], []
    for turn in range(repeat):
        if turn % 2:
            b.append(_median_time(second, 1))
            a.append(_median_time(first, 1))
        else:
            a.append(_median_time(first, 1))
            b.append(_median_time(second, 1))
    return statistics.median(a), statistics.median(b)


def _step_times(engine: Engine, size: int, key: str, repeat: int) -> tuple[float, float]:
    """Seconds per denoising step without and with adapter `key`."""
    base, adapted = _steps(engine, size, None, _one(key))
    return _interleaved(base, adapted, repeat)


def _operations(step: Callable[[], None]) -> int:
    """The aten operations one call of `step` runs, after a first call (a batch's first step stacks its
    adapters, once for all its steps)."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for event in prof.events() if event.name.startswith("aten::"))


def operations_per_step(model: BenchModel, root: Path, *, size: int, batch: int = 8) -> list[Row]:
    """The operations of one denoising step on a batch of `batch` samples over 1, 4 and 8 distinct adapters
    (and over pairs of adapters per sample), counted by the torch profiler, against the same batch on one
    adapter: flat in the mix means the same count whatever the mix."""
    paths = adapter_set(root, model, batch)
    engine = _engine(model, max_batch_size=batch)
    rows = []
    try:
        table = engine._adapters  # noqa: SLF001 - the slots as the worker applies them, timed without admission
        leases = [table.acquire(LoraRequest(path=str(p))) for p in paths]
        keys = [lease.entry.internal_name for lease in leases]
        mixes: dict[str, Samples | None] = {"no adapter": None}
        for distinct in (1, 4, 8):
            mixes[f"{distinct} distinct adapter{'s' if distinct > 1 else ''}"] = [
                [(keys[i % distinct], 1.0)] for i in range(batch)
            ]
        mixes["8 distinct pairs of adapters"] = [[(keys[i], 0.5), (keys[(i + 1) % batch], 0.7)] for i in range(batch)]
        counts = {
            name: _operations(step)
            for name, step in zip(mixes, _steps(engine, size, *mixes.values(), batch=batch), strict=True)
        }
        for lease in leases:
            lease.release()
    finally:
        engine.close()
    one = counts["1 distinct adapter"]
    for name, count in counts.items():
        if name in ("no adapter", "1 distinct adapter"):
            continue
        rows.append(
            Row(
                f"operations per denoising step, batch of {batch} on {name} vs on one adapter ({model.name}, {size}px)",
                count,
                one,
                "ops",
                count / one,
                "<= 1",
                count <= one,
                f"aten operations counted by torch.profiler; {counts['no adapter']} without adapters",
            )
        )
    return rows


def switching_and_step(
    model: BenchModel, root: Path, *, size: int, iterations: int, repeat: int, resident: tuple[int, ...] = (1, 10, 100)
) -> list[Row]:
    """Switching cost with 1, 10 and 100 (`resident`) adapters loaded, against one denoising step; and a step
    with an adapter against a base step."""
    paths = adapter_set(root, model, max(resident))
    engine = _engine(model, max_device_adapters=max(resident) + 1)
    rows = []
    try:
        for path in paths:
            engine.load_adapter(str(path))
        table = engine._adapters  # noqa: SLF001 - the engine's own admission path, timed without denoising
        lease = table.acquire(LoraRequest(path=str(paths[0])))
        step_base, step_lora = _step_times(engine, size, lease.entry.internal_name, repeat)
        lease.release()
        rows.append(
            Row(
                f"denoising step with an adapter vs base step ({model.name}, {size}px)",
                step_lora,
                step_base,
                "s/step",
                step_lora / step_base,
                "<= 1.05",
                step_lora / step_base <= 1.05,
            )
        )
        lora = engine.lora
        for loaded in resident:
            names = [p.name for p in paths[:loaded]]

            def switch(names: list[str] = names) -> None:
                for i in range(iterations):
                    lease = table.acquire(LoraRequest(name=names[i % len(names)], scale=0.5 + (i % 3) * 0.25))
                    with lora.applied([[(lease.entry.internal_name, lease.scale)]]):
                        pass
                    lease.release()

            per_switch = _median_time(switch, 3) / iterations
            rows.append(
                Row(
                    f"switching cost, {loaded} resident adapter(s), vs one step ({model.name}, {size}px)",
                    per_switch,
                    step_base,
                    "s",
                    per_switch / step_base,
                    "< 0.01",
                    per_switch / step_base < 0.01,
                    "admission + activation of an adapter already loaded, per request",
                )
            )
    finally:
        engine.close()
    return rows


def lycoris_step(model: BenchModel, root: Path, *, size: int, repeat: int, rank: int = 8) -> list[Row]:
    """A denoising step with a LoHa and with a LoKr of rank `rank` (the LoHa applied as its exact pair, the LoKr
    as its Kronecker factors) against a step with a LoRA of that rank on the same modules."""
    spec = model.spec
    if spec is None:
        raise ValueError(f"{model.name}: the LyCORIS rows are written for an SD3 benchmark model")
    lora = write_adapter(root / f"{model.name}-step-lora", spec, rank=rank, seed=7)
    files = {
        algorithm: write_lycoris_file(
            root / f"{model.name}-step-{algorithm}.safetensors", spec, algorithm=algorithm, rank=rank, seed=8
        )
        for algorithm in ("loha", "lokr")
    }
    engine = _engine(model)
    rows = []
    try:
        table = engine._adapters  # noqa: SLF001 - the slots as the worker applies them, timed without admission
        lora_lease = table.acquire(LoraRequest(path=str(lora)))
        for algorithm, file in files.items():
            lease = table.acquire(LoraRequest(path=str(file)))
            pair_rank = engine.lora.applied_rank(lease.entry.internal_name)
            with_lora, with_lycoris = _steps(
                engine, size, _one(lora_lease.entry.internal_name), _one(lease.entry.internal_name)
            )
            step_lora, step_lycoris = _interleaved(with_lora, with_lycoris, repeat)
            lease.release()
            rows.append(
                Row(
                    f"denoising step with a {'LoHa' if algorithm == 'loha' else 'LoKr'} (rank {rank}, applied at "
                    f"rank {pair_rank}) vs a LoRA of rank {rank} ({model.name}, {size}px)",
                    step_lycoris,
                    step_lora,
                    "s/step",
                    step_lycoris / step_lora,
                    "<= 1.05",
                    step_lycoris / step_lora <= 1.05,
                    "LyCORIS step / LoRA step",
                )
            )
        lora_lease.release()
    finally:
        engine.close()
    return rows


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(file.read_bytes())


def _with_own_metadata(folder: Path, copy: Path, tag: str) -> Path:
    """A copy of a PEFT folder whose weights file has metadata of its own, as a trainer writes per run (Kohya's
    ss_* entries), its tensors unchanged."""
    shutil.copytree(folder, copy, dirs_exist_ok=True)
    file = copy / "adapter_model.safetensors"
    save_safetensors(load_safetensors(file.read_bytes()), str(file), metadata={"format": "pt", "ss_seed": tag})
    return copy


def _with_own_layout(folder: Path, copy: Path, index: int) -> Path:
    """A copy of a PEFT folder without some of its modules: the `index`-th set of one, then of two (every index
    its own set, so every copy is a layout of its own)."""
    shutil.copytree(folder, copy, dirs_exist_ok=True)
    file = copy / "adapter_model.safetensors"
    tensors = load_safetensors(file.read_bytes())
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in tensors})
    subsets = itertools.chain.from_iterable(itertools.combinations(modules, size) for size in (1, 2))
    dropped = next(itertools.islice(subsets, index, None))
    kept = {key: tensor for key, tensor in tensors.items() if key.rsplit(".lora_", 1)[0] not in dropped}
    save_safetensors(kept, str(file), metadata={"format": "pt"})
    return copy


# Reads (or loads) in a row before the other side's turn in the cold-load measurement.
_BLOCK = 5


def _touch_memory(nbytes: int) -> None:
    """Have the process touch `nbytes` of fresh memory once, then free it. A virtual machine backs guest memory
    on its first touch, at ms per MiB (seen here, reading 1 MiB into memory kept: 2.7 ms before, 0.47 ms after,
    and 0.06 ms into memory reused), far more than the loads measured: without this, whichever side first grows
    the heap pays it."""
    block = torch.ones(nbytes, dtype=torch.uint8)
    del block


def cold_load_and_memory(model: BenchModel, root: Path, *, count: int, rank: int) -> list[Row]:
    """A cold load from disk against a plain read of the same file: for fine-tunes of one recipe (one layout,
    judged once), for the same with metadata of their own (as trainers write it per run: the tensor section is
    still judged once), and for adapters each of a layout not seen before (one or two modules fewer than the
    recipe's: every header judged, the layout put together from its modules' verdicts); resident memory per
    adapter.

    Both sides keep what they read, as a server keeps an adapter it loaded: a plain read whose tensors are
    dropped reuses its buffers, where every load takes fresh memory. The sides take turns in blocks (plain
    reads, then loads, ...), so that neither is handed memory the other just freed. The CPU's share alone, with
    memory reused on both sides (each adapter unloaded again, each read dropped), is the last row."""
    paths = adapter_set(root, model, count, rank=rank)
    runs = [_with_own_metadata(path, root / f"{path.name}-run", f"run-{i}") for i, path in enumerate(paths)]
    unseen = [_with_own_layout(path, root / f"{path.name}-unseen", i) for i, path in enumerate(paths)]
    cpu_only = [_with_own_layout(path, root / f"{path.name}-cpu", count + i) for i, path in enumerate(paths)]
    disk = sum((p / "adapter_model.safetensors").stat().st_size for p in paths[1:]) / (count - 1)
    engine = _engine(model, max_device_adapters=3 * count + 1)
    kinds = {"recipe": paths[1:], "runs": runs[1:], "unseen": unseen[1:]}
    times: dict[str, list[float]] = {name: [] for kind in kinds for name in (kind, f"{kind} plain")}
    try:
        engine.load_adapter(str(paths[0]))  # warm-up: first hooks, allocator
        engine.unload_adapter(path=str(paths[0]))
        _touch_memory(int(8 * disk * count))  # what both sides will hold, and the plain reads' transient copies
        held: list[dict[str, torch.Tensor]] = []  # the plain reads' tensors, held as the engine holds its own
        for block in range(0, count - 1, _BLOCK):
            for kind, group in kinds.items():
                files = [path / "adapter_model.safetensors" for path in group[block : block + _BLOCK]]
                for file in files:
                    started = time.perf_counter()
                    held.append(_read_tensors(file))
                    times[f"{kind} plain"].append(time.perf_counter() - started)
                for file in files:
                    started = time.perf_counter()
                    engine.load_adapter(str(file.parent))
                    times[kind].append(time.perf_counter() - started)
        loaded = sum((path / "adapter_model.safetensors").stat().st_size for group in kinds.values() for path in group)
        resident = engine.lora.resident_bytes() / loaded  # (the new layouts' files are a module or two smaller)
        del held
        # The CPU's share: a new layout each time, memory reused on both sides (each adapter unloaded again).
        reused: list[float] = []
        reused_plain: list[float] = []
        for path in cpu_only[1:]:
            started = time.perf_counter()
            _read_tensors(path / "adapter_model.safetensors")
            reused_plain.append(time.perf_counter() - started)
            started = time.perf_counter()
            engine.load_adapter(str(path))
            reused.append(time.perf_counter() - started)
            engine.unload_adapter(path=str(path))
    finally:
        engine.close()
    median = {kind: statistics.median(values) for kind, values in times.items()}
    ratio = {kind: median[kind] / median[f"{kind} plain"] for kind in kinds}
    cpu_ratio = statistics.median(reused) / statistics.median(reused_plain)
    size = f"{model.name}, rank {rank}, {disk / 1024:.0f} KiB"
    return [
        Row(
            f"cold load vs plain read of the file into tensors ({size})",
            median["recipe"],
            median["recipe plain"],
            "s",
            ratio["recipe"],
            "<= 1.5",
            ratio["recipe"] <= 1.5,
            "read + validate + fit check + attach, per adapter; one recipe: the layout is judged once",
        ),
        Row(
            f"cold load vs plain read, one recipe, metadata written per run ({size})",
            median["runs"],
            median["runs plain"],
            "s",
            ratio["runs"],
            "<= 1.5",
            ratio["runs"] <= 1.5,
            "each file's metadata its own (as Kohya's scripts write): judged at every load, the tensors once",
        ),
        Row(
            f"cold load of a layout not seen before vs plain read ({size})",
            median["unseen"],
            median["unseen plain"],
            "s",
            ratio["unseen"],
            "<= 1.5",
            ratio["unseen"] <= 1.5,
            "each file a layout of its own (a module or two fewer): its header judged, its modules' verdicts reused",
        ),
        Row(
            f"resident memory per loaded adapter vs its size on disk ({model.name}, rank {rank})",
            resident * disk,
            disk,
            "bytes",
            resident,
            "~ 1",
            resident <= 1.05,
            "tensor bytes held by the engine / safetensors file size",
        ),
        Row(
            f"CPU time of a cold load of a new layout vs a plain read, memory reused ({model.name}, rank {rank})",
            statistics.median(reused),
            statistics.median(reused_plain),
            "s",
            cpu_ratio,
            "",
            None,
            "each load unloaded again and the plain read's tensors dropped: no fresh memory on either side",
        ),
    ]
