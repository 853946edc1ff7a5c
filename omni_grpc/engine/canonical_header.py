"""The fast path of the safetensors header check: headers as safetensors itself writes them.

Every writer of safetensors files (the Rust library behind `save_file`, `save_pretrained`, Kohya's scripts)
emits one form: an optional `__metadata__` object of strings first, then each tensor's `dtype`, `shape` and
`data_offsets`, their data contiguous from offset 0 in header order. A header in that form is decoded by
msgspec against the entries' schema (types, integer bounds, name lengths: checked in C, no Python object per
JSON value), then its offsets are judged in one pass: several times cheaper than the general check, which a
small adapter's load would otherwise spend most of its time in.

This path only ever accepts: anything outside that form, and everything wrong, returns None, and the
general check (`safetensors_reader._judge_header`) then gives the verdict and the message. What this accepts,
that check accepts with the same result (tests/test_canonical_header.py holds them to it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from omni_grpc.engine.safetensors_format import DTYPE_SIZES, FLOAT_DTYPES, MAX_KEY_CHARS, TensorInfo

_METADATA_FIRST = '{"__metadata__":'
# Parses one JSON value from a position, objects as tuples of pairs (see split_metadata).
_PAIRS = json.JSONDecoder(object_pairs_hook=tuple)

_ENTRIES = msgspec.json.Decoder(dict[Annotated[str, msgspec.Meta(max_length=MAX_KEY_CHARS)], TensorInfo])

CheckedHeader = tuple[Mapping[str, TensorInfo], Mapping[str, str], str | None]
CheckedTensors = tuple[dict[str, TensorInfo], str | None]


def canonical_header(
    text: str, split: tuple[str, dict[str, str]] | None, data_len: int, max_tensors: int
) -> CheckedHeader | None:
    """The tensors, metadata and main float dtype of a header (`text`, and `split` its split_metadata) in the
    canonical form whose tensors tile a data region of `data_len` bytes; None for any other header (valid or
    not)."""
    checked = _tensors("{" + split[0] if split is not None else text, data_len, max_tensors)
    if checked is None:
        return None
    return checked[0], split[1] if split is not None else {}, checked[1]


def _tensors(section: str, data_len: int, max_tensors: int) -> CheckedTensors | None:
    """The tensors and main float dtype of a JSON object of tensor entries only (a header without metadata, or
    its tensor section as an object) that tile a data region of `data_len` bytes; None for anything else."""
    # msgspec keeps the last of a repeated key or field, where the general check refuses the header. Every key
    # is followed by a colon, and the entries written (overwritten ones too) each had a name and three fields
    # (unknown ones are refused): so the section's colons are at least 4 per entry decoded, and exactly that
    # many iff no key or field was repeated and no colon is inside a string. Escapes are left to the general
    # check altogether (a backslash could hide anything from such counts).
    if "\\" in section:
        return None
    try:
        entries = _ENTRIES.decode(section)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
    count = len(entries)
    if not count or count > max_tensors or section.count(":") != 4 * count or "__metadata__" in entries:
        return None
    dtypes: set[str] = set()
    sizes, prod, reach = DTYPE_SIZES, math.prod, 0
    for info in entries.values():
        dtype, span = info.dtype, info.data_offsets
        begin, end = span.begin, span.end
        size = sizes.get(dtype)
        # One entry after the other from offset 0, each exactly its shape's bytes.
        if size is None or begin != reach or prod(info.shape) * size != end - begin:
            return None
        reach = end
        dtypes.add(dtype)
    if reach != data_len:
        return None
    floats = [name for name in FLOAT_DTYPES if name in dtypes]
    if len(floats) > 1:  # the dtype most of the bytes are (the first to appear of a tie, as the general check)
        bytes_of: dict[str, int] = {}
        for info in entries.values():
            if info.dtype in FLOAT_DTYPES:
                bytes_of[info.dtype] = bytes_of.get(info.dtype, 0) + info.end - info.begin
        return entries, max(bytes_of, key=bytes_of.__getitem__)
    return entries, floats[0] if floats else None


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
