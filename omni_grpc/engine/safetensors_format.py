"""What a safetensors header may declare for an adapter: dtypes, sizes and the limits every check applies."""

from __future__ import annotations

from typing import NamedTuple

# safetensors dtype names of the tensors an adapter may hold, with their sizes in bytes. Integers only for
# scalars such as Kohya's `.alpha` (diffusers' convert_state_dict_to_kohya writes it as I64).
DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4}
FLOAT_DTYPES = ("F32", "F16", "BF16")
MAX_FILE_BYTES = 4 << 30
MAX_KEY_CHARS = 512


class TensorInfo(NamedTuple):
    """One tensor as the header declares it (offsets are relative to the data region)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
