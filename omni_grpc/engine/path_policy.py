"""Which adapter paths a client may name: only ones inside the operator's --lora-dirs.

Checked on the string and on the real path (symlinks followed) before any adapter file is opened, so a
request cannot make the server read outside those folders. Adapters the operator pre-loads with
--lora-path are the operator's choice and stay allowed wherever they are.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from omni_grpc.errors import InvalidArgument, PermissionDenied
from omni_grpc.quoting import shown

# The files an adapter folder may hold that the server reads (see adapter_files).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "pytorch_lora_weights.safetensors")


# The longest adapter path a client may send (Linux's PATH_MAX).
MAX_PATH_CHARS = 4096


class RealPath(str):
    """A path `real_path` gave: absolute, symlinks resolved. What the engine resolved once (to check it against
    --lora-dirs) keys the adapter table as it is, not resolved again (a kernel round trip per load and request).
    Anything made from it (joined, sliced) is a plain str again."""

    __slots__ = ()


def real_path(path: str) -> RealPath:
    """`os.path.realpath(path)`, asked of the kernel where it can answer (an O_PATH open and a readlink of it,
    where realpath lstats every component in Python: several times slower, and asked at every load)."""
    if _O_PATH is None:
        return RealPath(os.path.realpath(path))
    try:
        fd = os.open(path, _O_PATH | os.O_CLOEXEC)
    except (OSError, ValueError):  # nothing there (realpath still says where it would be), or a NUL byte
        return RealPath(os.path.realpath(path))
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc
        return RealPath(os.path.realpath(path))
    finally:
        os.close(fd)
    # (A file deleted meanwhile reads "... (deleted)"; anything not absolute is no path here.)
    return RealPath(real if real.startswith("/") and not real.endswith(" (deleted)") else os.path.realpath(path))


_O_PATH: int | None = getattr(os, "O_PATH", None)


def check_path_text(path: str) -> None:
    """What any adapter path must be before it is looked at: not empty, not too long, no NUL byte."""
    if not path:
        raise InvalidArgument("adapter path must not be empty", field="path")
    if len(path) > MAX_PATH_CHARS:
        raise InvalidArgument(
            f"adapter path is {len(path)} characters long; the limit is {MAX_PATH_CHARS}", field="path"
        )
    if "\x00" in path:
        raise InvalidArgument("adapter path must not contain NUL bytes", field="path")


class PathPolicy:
    def __init__(self, roots: Iterable[str], *, allow_any: bool = False) -> None:
        # Real paths, so that a root given through a symlink still contains what it points to.
        self._roots = [real_path(os.path.expanduser(root)) for root in roots]
        self._allow_any = allow_any
        self._operator_paths: set[str] = set()

    def allow(self, real_path: str) -> None:
        """An operator's adapter (--lora-path): clients may name it by path too."""
        self._operator_paths.add(real_path)

    def resolve(self, path: str) -> RealPath:
        """The real path `path` names, if a client may load it; raises otherwise, opening nothing.

        Relative paths are taken relative to each root in turn (the first where the path exists wins).
        """
        check_path_text(path)
        expanded = os.path.expanduser(path)
        if self._allow_any:
            return real_path(expanded)
        if os.path.isabs(expanded):
            candidates = [real_path(expanded)]
        else:
            candidates = [real_path(os.path.join(root, expanded)) for root in self._roots]
            # Prefer a root where the path exists; otherwise the first (NOT_FOUND follows from the read).
            candidates.sort(key=lambda candidate: not os.path.lexists(candidate))
        for real in candidates:
            if real in self._operator_paths:
                return real
            if self._inside_a_root(real):
                self._check_files_inside(path, real)
                return real
        if not self._roots:
            raise PermissionDenied(
                f"adapter path {shown(path)} is refused: this server loads adapters by path only from the folders "
                "given with --lora-dirs, and none were given (adapters pre-loaded with --lora-path can be used "
                "by name or id)",
                field="path",
            )
        raise PermissionDenied(
            f"adapter path {shown(path)} is outside the adapter folders this server allows (--lora-dirs)", field="path"
        )

    def is_operator_path(self, real_path: str) -> bool:
        """An adapter pre-loaded with --lora-path: its files may live anywhere (a hub cache links to blobs)."""
        return self._allow_any or real_path in self._operator_paths

    def may_open(self, real_file: str) -> bool:
        """Whether the server may open this file (a real path) for a client's adapter: asked at every open,
        re-reads from the disk tier included, so a link swapped in after `resolve` is still caught."""
        return self._allow_any or self._inside_a_root(real_file)

    def _check_files_inside(self, path: str, real: str) -> None:
        """A folder inside whose adapter files link elsewhere escapes too (checked with lstat, not open)."""
        if not os.path.isdir(real):
            return
        for name in ADAPTER_FILES:
            file = os.path.join(real, name)
            if os.path.lexists(file) and not self._inside_a_root(real_path(file)):
                raise PermissionDenied(
                    f"adapter path {shown(path)}: its file {name} links outside the adapter folders this server "
                    "allows (--lora-dirs)",
                    field="path",
                )

    def _inside_a_root(self, real: str) -> bool:
        return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in self._roots)
