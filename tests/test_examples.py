"""The guide's offline example script, run as the guide runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from omni_grpc.errors import NotFound
from tests.helpers import REPO


def run_example(*args: str, cache_root: Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMNI_GRPC_CACHE": str(cache_root), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "examples.offline_inference.lora_inference.lora_inference", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_in_process(*args: str) -> int:
    from examples.offline_inference.lora_inference.lora_inference import main

    return main(list(args))


COMMON = ["--prompt", "A piece of cheesecake", "--lora-scale", "1.0", "--num-inference-steps", "3"]
SIZE = ["--height", "64", "--width", "64", "--seed", "5"]


def test_offline_example_preloaded_as_the_readme_runs_it(cache_root: Path, tmp_path: Path) -> None:
    """`omni-grpc example-adapter`, then `python -m examples... --lora-path ./loras/lora_adapter`, each in a
    process of its own, as the README runs them (here from an empty folder rather than the checkout)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    written = subprocess.run(
        [sys.executable, "-m", "omni_grpc", "example-adapter", "--cache-dir", str(cache_root)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert written.returncode == 0 and "wrote the example adapter to loras/lora_adapter" in written.stdout, written
    output = tmp_path / "out.png"
    done = run_example(
        *COMMON,
        "--lora-path",
        "./loras/lora_adapter",
        *SIZE,
        "--output",
        str(output),
        cache_root=cache_root,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "adapter lora_adapter" in done.stdout and "scale 1" in done.stdout
    assert "3/3" in done.stderr  # diffusers' progress bar
    with Image.open(output) as image:
        assert image.format == "PNG" and image.size == (64, 64)


def test_offline_example_per_request(
    cache_root: Path, style_a: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out.png"
    assert run_in_process(*COMMON, "--lora-request-path", str(style_a), *SIZE, "--output", str(output)) == 0
    captured = capsys.readouterr()
    assert "adapter style_a" in captured.out and "scale 1" in captured.out
    assert "3/3" in captured.err  # diffusers' progress bar
    with Image.open(output) as image:
        assert image.format == "PNG" and image.size == (64, 64)


def test_offline_example_base_and_per_request_id(
    cache_root: Path, style_a: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base_out, lora_out = tmp_path / "base.png", tmp_path / "lora.png"
    args = ["--prompt", "x", "--num-inference-steps", "2", "--height", "64", "--width", "64", "--seed", "1"]
    assert run_in_process(*args, "--output", str(base_out)) == 0
    assert (
        run_in_process(*args, "--lora-request-path", str(style_a), "--lora-request-id", "77", "--output", str(lora_out))
        == 0
    )
    assert "id 77" in capsys.readouterr().out
    assert base_out.read_bytes() != lora_out.read_bytes()


def test_offline_example_missing_adapter_fails_clearly(cache_root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(NotFound, match="does not exist on the server machine") as error:
        run_in_process("--prompt", "x", "--lora-request-path", str(missing), "--output", str(tmp_path / "x.png"))
    assert str(missing) in error.value.message


def test_offline_example_writes_an_mp4_on_a_video_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import av

    from omni_grpc.tiny_models.wan import build_tiny_wan

    model = build_tiny_wan(tmp_path / "wan")
    args = ["--model", str(model), "--prompt", "a cat", "--num-inference-steps", "2", "--height", "32", "--width", "48"]
    assert run_in_process(*args, "--num-frames", "5", "--fps", "8", "--output", str(tmp_path / "out.png")) == 0
    assert "5 frames at 8 fps" in capsys.readouterr().out
    with av.open(str(tmp_path / "out.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height, len(list(container.decode(stream)))) == (48, 32, 5)
