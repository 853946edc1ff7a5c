"""`omni-grpc bench [--quick | --smoke] [--out DIR]`: run every measurement and write the report."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
import time
from pathlib import Path

# Sizes. Quick runs in about two minutes on 2 CPU cores; smoke runs every measurement once at the smallest
# sizes (what the test suite runs: the figures mean nothing, the code paths are the full run's).
PROFILES = {
    "smoke": {
        "tiny": {"requests": 4, "adapters": 2, "clients": 2, "size": 32, "steps": 1, "repeat": 1},
        "small": {"requests": 2, "adapters": 2, "clients": 2, "size": 64, "steps": 1, "repeat": 1},
        "batch": {"batch": 8, "size": 32, "steps": 1, "repeat": 1},
        "switch": {"size": 64, "iterations": 30, "repeat": 2},
        "load": {"count": 3},
        "family": {"requests": 2, "adapters": 2, "clients": 2, "size": 64, "steps": 2, "repeat": 1},
    },
    "quick": {
        "tiny": {"requests": 16, "adapters": 8, "clients": 8, "size": 64, "steps": 4, "repeat": 1},
        "small": {"requests": 4, "adapters": 4, "clients": 4, "size": 256, "steps": 2, "repeat": 1},
        "batch": {"batch": 8, "size": 128, "steps": 2, "repeat": 1},
        "switch": {"size": 256, "iterations": 300, "repeat": 5},
        "load": {"count": 11},
        "family": {"requests": 8, "adapters": 4, "clients": 4, "size": 64, "steps": 2, "repeat": 1},
    },
    "full": {
        "tiny": {"requests": 48, "adapters": 16, "clients": 8, "size": 64, "steps": 8, "repeat": 3},
        "small": {"requests": 12, "adapters": 6, "clients": 4, "size": 512, "steps": 4, "repeat": 3},
        "batch": {"batch": 8, "size": 256, "steps": 2, "repeat": 5},
        "switch": {"size": 512, "iterations": 2000, "repeat": 9},
        "load": {"count": 41},
        "family": {"requests": 24, "adapters": 8, "clients": 8, "size": 64, "steps": 4, "repeat": 3},
    },
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="smaller workloads (about two minutes)")
    sizes.add_argument(
        "--smoke", action="store_true", help="every measurement once at the smallest sizes (the figures mean nothing)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="where to write json, md, png")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the benchmark models are cached")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="instead: a Zipf trace over many adapters on local Ray Serve clusters (the cluster extra)",
    )


def run(args: argparse.Namespace) -> int:
    # Heavy imports here: `omni-grpc gateway` builds the same parser and must not import torch.
    import torch

    from omni_grpc.bench import measure, report
    from omni_grpc.bench.fixtures import bench_models, family_models

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    profile_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    profile = PROFILES[profile_name]
    cache = args.cache_dir or Path(os.environ.get("OMNI_GRPC_CACHE", Path.home() / ".cache" / "omni-grpc"))
    if args.cluster:
        from omni_grpc.bench.cluster import run_cluster_bench

        return run_cluster_bench(args, cache)
    started = time.perf_counter()
    models = bench_models(cache)
    rows: list[measure.Row] = []
    with tempfile.TemporaryDirectory(prefix="omni-bench-") as tmp:
        root = Path(tmp)
        for name in ("tiny", "small"):
            rows.append(measure.mixed_workload(models[name], root, **profile[name]))
            print(report.markdown(rows[-1:]).splitlines()[-1], flush=True)
        small = models["small"]
        rows.append(measure.batch_across_adapters(small, root, **profile["batch"]))
        rows.extend(measure.operations_per_step(small, root, size=profile["batch"]["size"]))
        switch = profile["switch"]
        rows.extend(
            measure.switching_and_step(
                small, root, size=switch["size"], iterations=switch["iterations"], repeat=switch["repeat"]
            )
        )
        rows.extend(measure.lycoris_step(small, root, size=switch["size"], repeat=switch["repeat"]))
        for rank in (16, 64):
            rows.extend(measure.cold_load_and_memory(small, root, rank=rank, **profile["load"]))
        for model in family_models(cache).values():
            rows.append(measure.mixed_workload(model, root, **profile["family"]))
            print(report.markdown(rows[-1:]).splitlines()[-1], flush=True)
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "profile": profile_name,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 1),
    }
    paths = report.write(rows, meta, args.out)
    print()
    print(report.markdown(rows))
    print(f"{meta['profile']} run in {meta['seconds']} s; wrote {', '.join(str(p) for p in paths.values())}")
    return 0
