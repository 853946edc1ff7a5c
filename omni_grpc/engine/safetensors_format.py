"""What a safetensors header may declare for an adapter: dtypes, sizes and the limits every check applies."""

from __future__ import annotations

from typing import Annotated

import msgspec

# safetensors dtype names of the tensors an adapter may hold, with their sizes in bytes. Integers only for
# scalars such as Kohya's `.alpha` (diffusers' convert_state_dict_to_kohya writes it as I64).
DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4}
FLOAT_DTYPES = ("F32", "F16", "BF16")
MAX_FILE_BYTES = 4 << 30
MAX_KEY_CHARS = 512


# An integer no tensor's dimension or offset exceeds (a bool is not one): then products of a few stay small.
Natural = Annotated[int, msgspec.Meta(ge=0, le=MAX_FILE_BYTES)]


class Span(msgspec.Struct, array_like=True, frozen=True, gc=False, forbid_unknown_fields=True):
    """A tensor's bytes [begin, end) in the data region, as a header's `data_offsets` writes them. A struct the
    garbage collector does not track, where a tuple of two ints is tracked: a new layout's header has hundreds,
    and each collection they bring on walks every young object (a load is timed with them)."""

    begin: Natural
    end: Natural


class TensorInfo(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True):
    """One tensor as the header declares it (offsets are relative to the data region). Also the schema a header's
    entry is decoded against (canonical_header); made by hand, nothing is checked."""

    dtype: str
    # More dimensions than this are left to the general check (where its products stay cheap).
    shape: Annotated[tuple[Natural, ...], msgspec.Meta(max_length=8)]
    data_offsets: Span

    @property
    def begin(self) -> int:
        return self.data_offsets.begin

    @property
    def end(self) -> int:
        return self.data_offsets.end
