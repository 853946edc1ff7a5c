"""`omni-grpc bench --smoke` (every measurement of the full run, once, at the smallest sizes) runs end to end and
writes its table, JSON and chart (no timing asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.helpers import REPO


def test_the_benchmark_writes_its_report(cache_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "omni_grpc", "bench", "--smoke", "--out", str(out), "--cache-dir", str(cache_root)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    names = [r["measurement"] for r in report["results"]]
    assert len(names) == 26 and report["meta"]["profile"] == "smoke"
    fragments = ("mixed workload, tiny", "mixed workload, small", "different adapters", "switching cost, 100")
    fragments += ("operations per denoising step, batch of 8 on 8 distinct adapters",)
    fragments += ("LoHa", "LoKr", "sdxl model", "flux model", "qwen-image model", "wan model")
    fragments += ("cold load vs plain read", "metadata written per run", "cold load of a layout not seen before")
    fragments += ("memory reused",)
    for fragment in fragments:
        assert any(fragment in n for n in names), fragment
    assert all(r["ratio"] > 0 and r["ours"] > 0 and r["baseline"] > 0 for r in report["results"])
    assert [r["goal"] for r in report["results"] if r["met"] is None] == ["", ""]  # the CPU-time rows
    table = (out / "bench.md").read_text()
    assert table.startswith("| measurement | omni-grpc | baseline | ratio | goal | met |")
    assert table in done.stdout
    with Image.open(out / "bench.png") as chart:
        assert chart.format == "PNG" and chart.size[0] > 500
