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
_METADATA_FIRST = '{"__metadata__":'
# Parses one JSON value from a position, objects as tuples of pairs (see canonical_header).
_PAIRS = json.JSONDecoder(object_pairs_hook=tuple)

CheckedHeader = tuple[Mapping[str, TensorInfo], Mapping[str, str], str | None]


def canonical_header(text: str, data_len: int, max_tensors: int) -> CheckedHeader | None:
    """The tensors, metadata and main float dtype of a header in the canonical form whose tensors tile a data
    region of `data_len` bytes; None for any other header (valid or not)."""
    try:
        # Objects come back as tuples of (key, value) pairs, a repeated key still there; arrays as lists (so an
        # empty object is never taken for an empty array).
        pairs = json.loads(text, object_pairs_hook=tuple)
    except (ValueError, RecursionError):
        return None
    if type(pairs) is not tuple or not pairs:
        return None
    metadata: dict[str, str] | None = None
    if pairs[0][0] == "__metadata__":
        metadata = _strings(pairs[0][1])
        if metadata is None:
            return None
        pairs = pairs[1:]
    if not pairs or len(pairs) > max_tensors:
        return None
    tensors: dict[str, TensorInfo] = {}
    numbers: list[Any] = []  # every dimension and offset, judged together below
    reach = 0
    for key, value in pairs:
        # (An object of three members, whose fields come in one order.)
        if type(value) is not tuple or len(value) != 3 or len(key) > MAX_KEY_CHARS:
            return None
        (first, dtype), (second, shape), (third, offsets) = value
        if first != "dtype" or second != "shape" or third != "data_offsets" or type(dtype) is not str:
            return None
        if (
            dtype not in DTYPE_SIZES
            or type(shape) is not list
            or type(offsets) is not list
            or len(offsets) != 2
            or len(shape) > _MAX_DIMS
        ):
            return None
        numbers += shape
        numbers += offsets
        begin, end = offsets
        # (Compared before they are known to be integers: a non-integer fails below whatever this found.)
        if begin != reach:
            return None
        reach = end
        tensors[key] = TensorInfo(dtype, tuple(shape), begin, end)
    # One entry per tensor (no key twice, no __metadata__ but the first), tiling the data region.
    if len(tensors) != len(pairs) or "__metadata__" in tensors or reach != data_len:
        return None
    # Integers (bools are not), none negative, none beyond any file's size: then the products below are small.
    if set(map(type, numbers)) != {int} or min(numbers) < 0 or max(numbers) > MAX_FILE_BYTES:
        return None
    sizes: dict[str, int] = {}
    for dtype, shape, begin, end in tensors.values():
        nbytes = end - begin
        if math.prod(shape) * DTYPE_SIZES[dtype] != nbytes:
            return None
        sizes[dtype] = sizes.get(dtype, 0) + nbytes
    floats = [name for name in sizes if name in FLOAT_DTYPES]
    main_float = max(floats, key=sizes.__getitem__) if floats else None
    return tensors, metadata if metadata is not None else {}, main_float


def split_metadata(text: str) -> tuple[str, dict[str, str]] | None:
    """A header whose metadata comes first (as every writer puts it), as its tensor section (all that follows the
    metadata) and its metadata (an object of strings without a repeated key); None for any other header. What the
    header memo relies on (tests/test_canonical_header.py holds it): a header with the tensor section of a valid
    one is valid, with the same tensors, whenever its own metadata splits off like this."""
    if not text.startswith(_METADATA_FIRST):
        return None
    try:
        value, end = _PAIRS.raw_decode(text, len(_METADATA_FIRST))
    except (ValueError, RecursionError):
        return None
    metadata = _strings(value)
    if metadata is None or text[end : end + 1] != ",":
        return None
    return text[end + 1 :], metadata


def _strings(pairs: Any) -> dict[str, str] | None:
    """An object of strings without a repeated key, from the parser's pairs; None for anything else."""
    if type(pairs) is not tuple:
        return None
    out: dict[str, str] = {}
    for pair in pairs:
        if type(pair) is not tuple or type(pair[1]) is not str:
            return None
        out[pair[0]] = pair[1]
    return out if len(out) == len(pairs) else None
