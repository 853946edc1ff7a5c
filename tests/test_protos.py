"""The committed generated code is exactly what the proto produces today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

GENERATED = REPO / "omni_grpc" / "v1"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert [str(p) for p in fresh] == [
        "omni_grpc/v1/omni_pb2.py",
        "omni_grpc/v1/omni_pb2.pyi",
        "omni_grpc/v1/omni_pb2_grpc.py",
        "omni_grpc/v1/omni_pb2_grpc.pyi",
    ]
    stale = [str(p) for p in fresh if (tmp_path / p).read_bytes() != (REPO / p).read_bytes()]
    assert not stale, f"regenerate with `python scripts/gen_protos.py`: {stale} differ from protos/"


def test_stubs_import_without_torch() -> None:
    """Other services use the generated stubs; they must not pay for torch."""
    code = "import sys; from omni_grpc.v1 import omni_pb2_grpc; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
