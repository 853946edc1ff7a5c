"""The embedded default model, built once from code and cached on disk."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from omni_grpc.tiny_models import sd3

# Bump when the architecture/spec/build procedure changes so stale caches are not reused.
DEFAULT_MODEL_TAG = "tiny-sd3-v2"
CACHE_ENV = "OMNI_GRPC_CACHE"
# What GetServerInfo and the replies call the embedded default.
DEFAULT_MODEL_NAME = "omni-grpc/tiny-sd3"


def cache_folder(override: Path | None = None) -> Path:
    """Where built models are cached: `override`, else $OMNI_GRPC_CACHE, else ~/.cache/omni-grpc."""
    if override is not None:
        return Path(override)
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "omni-grpc"


def default_model_dir(cache_root: Path | None = None) -> Path:
    """Return the folder of the embedded default model (tiny SD3), building it if missing.

    Location: ``cache_root`` or ``$OMNI_GRPC_CACHE`` or ``~/.cache/omni-grpc``, then
    ``DEFAULT_MODEL_TAG``. The build goes to a temp dir next to it and is published
    with one atomic rename, so the folder is either absent or complete; if a
    concurrent builder wins the race its result is used.
    """
    root = cache_folder(cache_root).expanduser()
    final = root / DEFAULT_MODEL_TAG
    if (final / "model_index.json").is_file():
        return final

    root.mkdir(parents=True, exist_ok=True)
    if final.exists():
        # Only an atomic rename creates `final`, so a partial one came from elsewhere
        # (e.g. a manual copy); move it aside before rebuilding.
        stale = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_TAG}.stale-", dir=root))
        with contextlib.suppress(OSError):
            os.replace(final, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_TAG}.tmp-", dir=root))
    try:
        sd3.build_tiny_sd3(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process published first (ENOTEMPTY/EEXIST); use its copy.
            if not (final / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
