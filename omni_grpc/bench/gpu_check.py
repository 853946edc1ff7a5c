"""The checks that need a GPU, as one table (`scripts/gpu_check.sh`; `--smoke` runs the same code small, on
whatever device there is, to prove the script before a GPU is lent).

1. LoRA correctness in the GPU's dtype (bfloat16) on the embedded model: an image with an adapter against
   diffusers + peft running the same adapter (relative error), and the base image, with no adapter active,
   against diffusers' and against the engine's own before any adapter was loaded (bit for bit).
2. At 1024 px on a model of SD3.5-medium's geometry with random weights (`SD35_MEDIUM_GEOMETRY`): a
   denoising step with and without an adapter, a batch of 8 on 8 adapters against 8 on one, the operations
   per step, the mixed workload against plain diffusers, and the switching cost: the benchmark's own
   measurements (`measure.py`), on the GPU.

Writes gpu-check.{md,json} into `--out`; prints the table. About 6 minutes on an H200, most of it building
and saving the 2.5B-parameter model.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from omni_grpc.bench import measure, report
from omni_grpc.bench.baseline import DiffusersBaseline
from omni_grpc.bench.fixtures import BenchModel, cached, write_adapter
from omni_grpc.bench.measure import Row
from omni_grpc.config import EngineConfig
from omni_grpc.engine.engine import Engine
from omni_grpc.engine.types import GenerateRequest, LoraRequest, SamplingParams
from omni_grpc.tiny_models.default import default_model_dir
from omni_grpc.tiny_models.sd3 import SD35_MEDIUM_GEOMETRY, TinySD3Spec, build_tiny_sd3

# What runs at full size and in the smoke run.
SIZES = {
    "full": {"side": 1024, "steps": 4, "correct_side": 256, "requests": 16, "adapters": 8, "iterations": 300},
    "smoke": {"side": 64, "steps": 2, "correct_side": 64, "requests": 4, "adapters": 2, "iterations": 20},
}


def correctness(model: BenchModel, root: Path, *, side: int, steps: int) -> list[Row]:
    """The embedded model with an adapter against diffusers + peft; the base image against both sides'."""
    assert model.spec is not None
    adapter = write_adapter(root / "correctness", model.spec, rank=8, seed=3, magnitude=0.2)
    params = {"size": side, "steps": steps, "seed": 5}
    engine = Engine(EngineConfig(model=str(model.path), allow_any_lora_path=True)).start()
    try:
        sampling = SamplingParams(height=side, width=side, num_inference_steps=steps, seed=5)

        def ours(lora: LoraRequest | None) -> np.ndarray:
            result = engine.generate(GenerateRequest(prompt="a benchmark prompt", sampling=sampling, lora=lora))
            return np.asarray(result.images[0].array, dtype=np.float64)

        base_before = ours(None)
        with_lora = ours(LoraRequest(path=str(adapter)))
        base_after = ours(None)
        dtype = str(engine.pipeline.dtype).removeprefix("torch.")
    finally:
        engine.close()
    baseline = DiffusersBaseline(model.path, [adapter])
    ref_lora = baseline.run(adapter=adapter, scale=1.0, output_type="np", **params).images[0].astype(np.float64)
    ref_base = baseline.run(adapter=None, scale=1.0, output_type="np", **params).images[0].astype(np.float64)
    del baseline
    relative = float(np.linalg.norm(with_lora - ref_lora) / np.linalg.norm(ref_lora))
    moved = float(np.linalg.norm(ref_lora - ref_base) / np.linalg.norm(ref_base))
    base_gap = float(np.abs(base_before - ref_base).max())
    return [
        Row(
            f"image with a LoRA vs diffusers + peft ({model.name}, {side}px, {dtype})",
            relative,
            moved,
            "rel",
            relative / moved if moved else float("inf"),
            "< 0.1",
            relative < 0.1 * moved,
            "ours: relative error against peft's image; baseline: how far the adapter moves the image",
        ),
        Row(
            f"base image, no adapter active, vs diffusers' ({model.name}, {side}px, {dtype})",
            base_gap,
            0.0,
            "max |diff|",
            base_gap,
            "= 0",
            base_gap == 0.0,
            "largest difference of the float images",
        ),
        Row(
            f"base image after an adapter was used vs before any was loaded ({model.name}, {dtype})",
            float(np.abs(base_after - base_before).max()),
            0.0,
            "max |diff|",
            float(np.abs(base_after - base_before).max()),
            "= 0",
            bool(np.array_equal(base_after, base_before)),
            "bit for bit",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omni_grpc.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes, any device: proves the script runs")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="where to write gpu-check.{md,json}")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the models are built (default: a temp dir)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    size = SIZES["smoke" if args.smoke else "full"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="omni-gpu-check-") as tmp:
        cache = args.cache_dir or Path(tmp) / "models"
        root = Path(tmp) / "adapters"
        tiny = BenchModel("tiny", default_model_dir(cache), TinySD3Spec())

        def show(new: list[Row]) -> None:
            rows.extend(new)
            print(report.markdown(new), flush=True)

        show(correctness(tiny, root, side=size["correct_side"], steps=size["steps"]))
        spec = TinySD3Spec() if args.smoke else SD35_MEDIUM_GEOMETRY
        name = "tiny" if args.smoke else "sd3.5-medium geometry"
        dtype = torch.bfloat16 if device == "cuda" else None
        built = time.perf_counter()
        path = cached(
            cache / f"gpu-check-{'smoke' if args.smoke else 'sd35m'}",
            lambda out: build_tiny_sd3(out, spec, dtype=dtype),
        )
        print(f"model built in {time.perf_counter() - built:.0f} s", flush=True)
        big = BenchModel(name, path, spec)
        side, steps = size["side"], size["steps"]
        show(
            measure.switching_and_step(big, root, size=side, iterations=size["iterations"], repeat=5, resident=(1, 16))
        )
        show([measure.batch_across_adapters(big, root, batch=8, size=side, steps=steps, repeat=3)])
        show(measure.operations_per_step(big, root, size=side))
        show(
            [
                measure.mixed_workload(
                    big,
                    root,
                    requests=size["requests"],
                    adapters=size["adapters"],
                    clients=8,
                    size=side,
                    steps=steps,
                    repeat=2,
                )
            ]
        )
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "profile": "smoke" if args.smoke else "full",
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-check.json").write_text(
        json.dumps({"meta": meta, "results": [r.as_dict() for r in rows]}, indent=2)
    )
    table = report.markdown(rows)
    (args.out / "gpu-check.md").write_text(f"{meta}\n\n{table}")
    print(f"\n{meta}\n\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
