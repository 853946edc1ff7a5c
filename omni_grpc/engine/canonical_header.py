"""The fast path of the safetensors header check: headers as safetensors itself writes them.

Every writer of safetensors files (the Rust library behind `save_file`, `save_pretrained`, Kohya's scripts)
emits one form: an optional `__metadata__` object of strings, then each tensor as exactly `dtype`, `shape`,
`data_offsets` in that order, their data contiguous from offset 0 in header order. A header in that form is
judged here in one pass over the parser's own pairs (no per-object hook, no per-tensor call), which is
several times cheaper than the general check that a small adapter's load would otherwise spend most of its
time in.

This path only ever accepts: anything outside that form, and everything wrong, returns None, and the
general check (`safetensors_reader._judge_header`) then gives the verdict and the message. What this accepts,
that check accepts with the same result (tests/test_canonical_header.py holds them to it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from omni_grpc.engine.safetensors_format import DTYPE_SIZES, FLOAT_DTYPES, MAX_FILE_BYTES, MAX_KEY_CHARS, TensorInfo

# No tensor has more dimensions than this; more is left to the general check (its products stay cheap there).
_MAX_DIMS = 8
_FIELDS = ("dtype", "shape", "data_offsets")

CheckedHeader = tuple[Mapping[str, TensorInfo], Mapping[str, str], str | None]


def canonical_header(text: str, data_len: int, max_tensors: int) -> CheckedHeader | None:
    """The tensors, metadata and main float dtype of a header in the canonical form whose tensors tile a data
    region of `data_len` bytes; None for any other header (valid or not)."""
    try:
        # Objects come back as lists of (key, value) tuples, arrays as lists: a repeated key is still there.
        pairs = json.loads(text, object_pairs_hook=list)
    except (ValueError, RecursionError):
        return None
    if type(pairs) is not list or not pairs:
        return None
    metadata: dict[str, str] | None = None
    tensors: dict[str, TensorInfo] = {}
    numbers: list[Any] = []  # every dimension and offset, judged together below
    reach, count = 0, 0
    for pair in pairs:
        if type(pair) is not tuple:  # the header was an array, not an object
            return None
        key, value = pair
        if key == "__metadata__":
            if metadata is not None or count or type(value) is not list:
                return None
            metadata = _strings(value)
            if metadata is None:
                return None
            continue
        count += 1
        if type(value) is not list or len(value) != 3 or len(key) > MAX_KEY_CHARS:
            return None
        first, second, third = value
        if type(first) is not tuple or type(second) is not tuple or type(third) is not tuple:
            return None
        if (first[0], second[0], third[0]) != _FIELDS:
            return None
        dtype, shape, offsets = first[1], second[1], third[1]
        if type(dtype) is not str or type(shape) is not list or type(offsets) is not list:
            return None
        if dtype not in DTYPE_SIZES or len(offsets) != 2 or len(shape) > _MAX_DIMS:
            return None
        numbers += shape
        numbers += offsets
        begin, end = offsets
        # (Compared before they are known to be integers: a non-integer fails below whatever this found.)
        if begin != reach:
            return None
        reach = end
        tensors[key] = TensorInfo(dtype, tuple(shape), begin, end)
    if not tensors or len(tensors) != count or count > max_tensors or reach != data_len:
        return None
    # Integers (bools are not), none negative, none beyond any file's size: then the products below are small.
    if set(map(type, numbers)) != {int} or min(numbers) < 0 or max(numbers) > MAX_FILE_BYTES:
        return None
    sizes: dict[str, int] = {}
    for info in tensors.values():
        nbytes = math.prod(info.shape) * DTYPE_SIZES[info.dtype]
        if nbytes != info.end - info.begin:
            return None
        if info.dtype in FLOAT_DTYPES:
            sizes[info.dtype] = sizes.get(info.dtype, 0) + nbytes
    main_float = max(sizes, key=lambda name: sizes[name]) if sizes else None
    return tensors, metadata if metadata is not None else {}, main_float


def _strings(pairs: list[Any]) -> dict[str, str] | None:
    """An object of strings without a repeated key, from the parser's pairs; None for anything else."""
    out: dict[str, str] = {}
    for pair in pairs:
        if type(pair) is not tuple or type(pair[1]) is not str:
            return None
        out[pair[0]] = pair[1]
    return out if len(out) == len(pairs) else None
