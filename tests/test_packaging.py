"""How the project installs: the gateway alone, with only its own dependencies and the generated stubs; the
single server without Ray (the cluster extra's)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

CHECK = """
import importlib.util, sys
import omni_grpc_gateway.app, omni_grpc_gateway.cli
from omni_grpc.v1 import SERVICE_NAME, omni_pb2_grpc
from omni_grpc.shared.logs import configure_logging
omni_grpc_gateway.app.create_app()
absent = [name for name in ("torch", "diffusers", "peft", "omni_grpc.engine", "omni_grpc.service", "gateway")
          if importlib.util.find_spec(name) is not None]
assert not absent, f"installed with the gateway: {absent}"
assert "torch" not in sys.modules
print(SERVICE_NAME)
"""


def test_the_gateway_installs_alone_without_torch_or_the_engine(tmp_path: Path) -> None:
    # Only the gateway's project and the server's folders it ships (the stubs, the shared modules), copied out: it
    # needs nothing else of the checkout.
    source = tmp_path / "src"
    skip = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    shutil.copytree(REPO / "gateway", source / "gateway", ignore=skip)
    for shipped in ("v1", "shared"):
        shutil.copytree(REPO / "omni_grpc" / shipped, source / "omni_grpc" / shipped, ignore=skip)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    done = subprocess.run(
        [*install, "-c", str(REPO / "constraints.txt"), str(source / "gateway")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Run from elsewhere, so that nothing of the checkout is on the path.
    checked = subprocess.run([str(python), "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert checked.stdout.strip() == "omni_grpc.v1.OmniService"
    help_text = subprocess.run(
        [str(venv / "bin" / "omni-grpc-gateway"), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert help_text.returncode == 0 and "--grpc-target" in help_text.stdout


def test_the_single_server_never_imports_ray() -> None:
    """Ray is the cluster extra's: `serve` and its parser load without it, even where it is installed."""
    check = (
        "import sys\n"
        "from omni_grpc.cli import build_parser\n"
        "import omni_grpc.service.server, omni_grpc.offline\n"
        "build_parser().parse_args(['serve'])\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
