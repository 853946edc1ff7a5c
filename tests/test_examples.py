"""The guide's offline example script, run as the guide runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.server_process import REPO


def run_example(*args: str, cache_root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMNI_GRPC_CACHE": str(cache_root)}
    return subprocess.run(
        [sys.executable, "-m", "examples.offline_inference.lora_inference.lora_inference", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("mode", ["--lora-path", "--lora-request-path"])
def test_offline_example_writes_the_image(cache_root: Path, style_a: Path, tmp_path: Path, mode: str) -> None:
    output = tmp_path / f"out{mode}.png"
    common = ["--prompt", "A piece of cheesecake", "--lora-scale", "1.0", "--num-inference-steps", "3"]
    size = ["--height", "64", "--width", "64", "--seed", "5", "--output", str(output)]
    done = run_example(*common, mode, str(style_a), *size, cache_root=cache_root)
    assert done.returncode == 0, done.stderr
    assert "adapter style_a" in done.stdout and "scale 1" in done.stdout
    assert "3/3" in done.stderr  # diffusers' progress bar
    with Image.open(output) as image:
        assert image.format == "PNG" and image.size == (64, 64)


def test_offline_example_base_and_per_request_id(cache_root: Path, style_a: Path, tmp_path: Path) -> None:
    base_out, lora_out = tmp_path / "base.png", tmp_path / "lora.png"
    args = ["--prompt", "x", "--num-inference-steps", "2", "--height", "64", "--width", "64", "--seed", "1"]
    assert run_example(*args, "--output", str(base_out), cache_root=cache_root).returncode == 0
    done = run_example(
        *args,
        "--lora-request-path",
        str(style_a),
        "--lora-request-id",
        "77",
        "--output",
        str(lora_out),
        cache_root=cache_root,
    )
    assert done.returncode == 0, done.stderr
    assert "id 77" in done.stdout
    assert base_out.read_bytes() != lora_out.read_bytes()


def test_offline_example_missing_adapter_fails_clearly(cache_root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    done = run_example("--prompt", "x", "--lora-request-path", str(missing), "--output", "x.png", cache_root=cache_root)
    assert done.returncode != 0 and str(missing) in done.stderr and "does not exist" in done.stderr
