"""Shared fixtures: the embedded model, real peft adapters, and a real server and gateway on loopback ports."""

from __future__ import annotations

import os

# Never reach for a model hub from tests, in this process or in servers it starts.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import InProcessGateway, InProcessServer, start_gateway, start_server
from tests.lora_factory import make_peft_adapter


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("omni-cache")
    os.environ["OMNI_GRPC_CACHE"] = str(root)
    return root


@pytest.fixture(scope="session")
def model_dir(cache_root: Path) -> Path:
    from omni_grpc.tiny_models.default import default_model_dir

    return default_model_dir(cache_root)


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="session")
def style_a(model_dir: Path, adapter_root: Path) -> Path:
    """alpha != r on purpose: a loader that assumes alpha == r gets the wrong image."""
    return make_peft_adapter(model_dir, adapter_root / "style_a", rank=4, alpha=8, seed=1)


@pytest.fixture(scope="session")
def style_b(model_dir: Path, adapter_root: Path) -> Path:
    return make_peft_adapter(model_dir, adapter_root / "style_b", rank=2, alpha=2, seed=2, targets=("to_q", "to_v"))


@pytest.fixture(scope="session")
def preloaded(model_dir: Path, adapter_root: Path) -> Path:
    return make_peft_adapter(model_dir, adapter_root / "pre", rank=4, alpha=4, seed=3)


@pytest.fixture(scope="session")
def server(
    cache_root: Path, model_dir: Path, adapter_root: Path, preloaded: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessServer]:
    """The shared server: embedded default model, one pinned pre-loaded adapter named "pre".

    Clients may load adapters from the adapter root (where relative paths resolve first) and from
    anywhere under pytest's base temporary folder (every test's tmp_path).
    """
    srv = start_server(
        [
            "--cache-dir",
            str(cache_root),
            "--lora-path",
            f"pre={preloaded}",
            "--max-loaded-adapters",
            "16",
            "--max-pixels",
            "1048576",
            "--lora-dirs",
            str(adapter_root),
            "--lora-dirs",
            str(tmp_path_factory.getbasetemp()),
        ],
        log_path=tmp_path_factory.mktemp("logs") / "server.log",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def gateway(server: InProcessServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessGateway]:
    """The REST gateway in front of the shared server, with `omni-grpc gateway`'s defaults (admin routes off)."""
    gw = start_gateway(server.target, [], log_path=tmp_path_factory.mktemp("logs") / "gateway.log")
    yield gw
    gw.stop()
