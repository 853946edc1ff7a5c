"""A hardened reader of safetensors files and small JSON files. Never pickle.

Everything a file declares (header size, tensor count, dtypes, shapes, offsets) is checked before any
tensor data is read, and every failure is an InvalidArgument (or PermissionDenied) naming the file: bad
input never surfaces as another exception. The header and the data come from one open descriptor, so
what is loaded is what was checked, even if the path is replaced meanwhile.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from omni_grpc.engine.canonical_header import canonical_header, split_metadata
from omni_grpc.engine.memo import Memo
from omni_grpc.engine.safetensors_format import (
    DTYPE_SIZES,
    FLOAT_DTYPES,
    MAX_FILE_BYTES,
    MAX_KEY_CHARS,
    Span,
    TensorInfo,
)
from omni_grpc.errors import InvalidArgument, PermissionDenied
from omni_grpc.quoting import shown

_TORCH_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
}
# Caps that keep refusing any file cheap (time and memory in proportion to its header): real LoRA files of the
# largest models have a few thousand tensors, keys under 200 characters and headers under a megabyte.
MAX_HEADER_BYTES = 8 << 20
MAX_TENSORS = 8192
# Every module a file adapts has at most this many tensors (a Tucker LoHa: w1_a, w1_b, w2_a, w2_b, t1, t2, alpha):
# a model with L layers an adapter can adapt needs at most this many per layer.
TENSORS_PER_LAYER = 7
_WHY_LIMIT = f" ({TENSORS_PER_LAYER} per layer of the model an adapter can adapt, at most {MAX_TENSORS})"
# Commas and colons in a header, counted before it is parsed: they bound how many JSON values parsing makes.
MAX_HEADER_SEPARATORS = 200_000
_KEY_CHARS = len('"data_offsets"')
# Tensor sections of headers up to this many characters are remembered once checked (see HeaderMemo), and layouts
# whose section and config together are no longer (see adapter_files.LayoutMemo); a 1,000-module adapter's is
# ~150 KB.
MEMO_HEADER_BYTES = 256 << 10

# Asked about the real path of every file opened; False refuses it (PermissionDenied).
MayOpen = Callable[[str], bool]
# What identifies one version of a file: device, inode, size and modification time (ns). Not the change
# time: deleting a file being read changes it, and what was opened is still read whole.
FileStamp = tuple[int, int, int, int]


def stamp_of(result: os.stat_result) -> FileStamp:
    return (result.st_dev, result.st_ino, result.st_size, result.st_mtime_ns)


def current_stamp(file: Path) -> FileStamp | None:
    """The stamp of the file at `file` now (None: it is gone)."""
    try:
        return stamp_of(os.stat(file))
    except OSError:
        return None


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked header: every tensor's dtype, shape and offsets are valid for the file's size. Files whose
    headers have the same tensor section share `tensors`, and files of the same header bytes `metadata` too (see
    HeaderMemo): they are never changed."""

    file: Path
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str]
    # The float dtype most of the data region's bytes hold (None: no float tensor).
    main_float: str | None


# Tensors of one dtype and shape at equal distances in the data region: (dtype, shape, their keys in order, the
# first one's offset, the distance between them (None for a run of one)).
ViewRun = tuple[str, tuple[int, ...], tuple[str, ...], int, int | None]


@dataclass(frozen=True)
class ViewPlan:
    """How a data region becomes its tensors: a file's A of every module, its B of every module, ... each come
    from one strided view, unbound (a small adapter has hundreds of tensors, and a view each costs more than the
    rest of its read: 64 tensors, 86 µs a view each, 50 µs this way, measured here). Planned once per tensor
    section (see HeaderMemo): what each load then does is a few torch calls."""

    runs: tuple[ViewRun, ...]
    # Tensors whose offset is not on an element boundary: copied (a view must start on one).
    copies: tuple[str, ...]


# Whether the header's metadata came first and was split off, the rest of its text (its tensor section; the whole
# text when nothing was split off), its data region's length and the tensor limit it was checked under -> what the
# check found (the metadata found is used only when nothing was split off: then the whole text was the same).
HeaderKey = tuple[bool, str, int, int]
HeaderMemo = Memo[HeaderKey, tuple[Mapping[str, TensorInfo], Mapping[str, str], str | None, ViewPlan]]


class SafetensorsFile:
    """An open safetensors file whose header has been checked; `read()` then loads its tensors.

    Header and data come from one descriptor: what is loaded is what was checked, even if the path is
    replaced or deleted meanwhile, and no mmap is left pointing at a file that may change later.
    """

    _plan: ViewPlan  # (set with the header)

    def __init__(
        self,
        file: Path,
        may_open: MayOpen | None = None,
        max_tensors: int = MAX_TENSORS,
        headers: HeaderMemo | None = None,
    ) -> None:
        self.file = file
        self._max_tensors = max_tensors
        self._headers = headers
        self._fd, opened = open_regular(file, may_open)
        self._data: torch.Tensor | None = None  # the data region, once read
        # The header's text without a metadata that comes first: equal sections, equal tensors (see HeaderMemo).
        self.tensor_section = ""
        try:
            self._size = opened.st_size
            # The version of the file that was opened: a later read tells a changed file by it.
            self.stamp = stamp_of(opened)
            self._prefix, self.header = self._read_header()
        except BaseException:
            os.close(self._fd)
            raise

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *_: object) -> None:
        os.close(self._fd)

    @property
    def data_bytes(self) -> int:
        """What reading every tensor allocates: the whole data region, which a checked header's tensors tile."""
        return self._size - len(self._prefix)

    def values_read(self) -> torch.Tensor | None:
        """The data region of the last `read`, as elements of the float dtype most of its bytes hold: one tensor
        whose largest |value| bounds every tensor of that dtype (other bytes read as that dtype may show as NaN
        or huge, never as smaller). None before a read or without a float tensor."""
        data, dtype = self._data, self.header.main_float
        if data is None or dtype is None:
            return None
        return _as_dtype(data, dtype)

    def read(self) -> dict[str, torch.Tensor]:
        """Every tensor. The data region is read once, straight into the memory the tensors then view (the
        file's bytes are never held twice); only now, after the caller judged the header."""
        file, start = self.file, len(self._prefix)
        data = torch.empty(self._size - start, dtype=torch.uint8)
        fd = self._fd
        into, got = data.numpy().data, 0
        try:
            while got < len(into):  # (one call reads at most about 2 GiB)
                count = os.preadv(fd, [into[got:]], start + got)
                if not count:
                    break
                got += count
            again = read_at(fd, start, 0)
        except OSError as exc:
            raise InvalidArgument(f"{file} could not be read: {exc}", field="path") from exc
        if got != data.numel():
            raise InvalidArgument(
                f"{file} is truncated: it was {self._size} bytes when opened, but only {start + got} could be read"
            )
        if again != self._prefix or stamp_of(os.fstat(fd)) != self.stamp:
            raise InvalidArgument(f"{file} changed while it was being read; retry once it is written")
        self._data = data
        return _views(data, self.header.tensors, self._plan)

    def _read_header(self) -> tuple[bytes, SafetensorsHeader]:
        file, size, fd = self.file, self._size, self._fd
        if size > MAX_FILE_BYTES:
            raise InvalidArgument(f"{file} is {size} bytes; adapters larger than {MAX_FILE_BYTES} are refused")
        prefix = read_at(fd, 8, 0)
        if len(prefix) < 8:
            raise InvalidArgument(f"{file} is not a safetensors file (shorter than its 8-byte header length)")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES:
            raise InvalidArgument(f"{file}: safetensors header of {length} bytes exceeds {MAX_HEADER_BYTES}")
        if 8 + length > size:
            raise InvalidArgument(
                f"{file} is truncated: its header length says {length} bytes, so the file should be at least "
                f"{8 + length} bytes, but it is {size}"
            )
        raw = read_at(fd, length, 8)
        if len(raw) != length:
            raise InvalidArgument(f"{file} is truncated: expected {length} header bytes, read {len(raw)}")
        # (Both counts below are needed only where they could exceed their limits: never in a small header.)
        separators = raw.count(b",") + raw.count(b":") if length > MAX_HEADER_SEPARATORS else 0
        if separators > MAX_HEADER_SEPARATORS:
            raise InvalidArgument(
                f"{file}: the safetensors header has {separators} separators; the limit is {MAX_HEADER_SEPARATORS} "
                "(far more than any adapter's tensors need)"
            )
        # Every tensor's entry has one "data_offsets" key (14 characters), which no JSON string can hold
        # unescaped: more than MAX_TENSORS of them is refused before the parse, whose cost grows with the entries.
        entries = raw.count(b'"data_offsets"') if length > _KEY_CHARS * self._max_tensors else 0
        if entries > self._max_tensors:
            raise InvalidArgument(f"{file} declares {entries} tensors; the limit is {self._max_tensors}{_WHY_LIMIT}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = ""  # parse_json says what is wrong with it; nothing of it is remembered
        # The tensors are judged once per tensor section (see HeaderMemo); metadata first, as every writer puts
        # it, is judged on its own at every load: trainers write their own per run (Kohya's ss_* entries).
        split = split_metadata(text)
        self.tensor_section = split[0] if split is not None else text
        key: HeaderKey = (split is not None, self.tensor_section, size - 8 - length, self._max_tensors)
        known = self._headers.get(key) if self._headers is not None and text else None
        if known is not None:  # this section passed every check below for a data region of this length
            tensors, metadata, main_float, self._plan = known
            metadata = split[1] if split is not None else metadata  # (split: this file's own, judged above)
            return prefix + raw, SafetensorsHeader(file, tensors, metadata, main_float)
        with paused_gc():
            header = _check_header(file, raw, text, split, size, 8 + length, self._max_tensors)
            self._plan = view_plan(header.tensors)
        if self._headers is not None and text and len(self.tensor_section) <= MEMO_HEADER_BYTES:
            # (A split-off metadata is judged at every load, never taken from here: not kept, nor its memory.)
            metadata = {} if split is not None else header.metadata
            self._headers.put(key, (header.tensors, metadata, header.main_float, self._plan))
        return prefix + raw, header


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection while a header's many small objects are made and judged: in a process that
    holds a model, each full collection walks every object it has (hundreds of ms), and parsing thousands of
    entries would start several. Reference counting still frees what is dropped; the collector resumes after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def open_safetensors(
    file: Path, may_open: MayOpen | None = None, max_tensors: int = MAX_TENSORS, headers: HeaderMemo | None = None
) -> SafetensorsFile:
    """Open `file` and check its header (at most `max_tensors` tensors; remembered in `headers`, if given); an
    OS error is an InvalidArgument naming the file."""
    try:
        return SafetensorsFile(file, may_open, max_tensors, headers)
    except OSError as exc:  # a permission denied, an I/O error, a path that changed type meanwhile, ...
        raise InvalidArgument(f"{file} could not be read: {exc}", field="path") from exc


def read_json(file: Path, max_bytes: int, may_open: MayOpen | None = None) -> tuple[Any, FileStamp, bytes]:
    """A small JSON file, strictly parsed (see `parse_json`), refused beyond `max_bytes`; its stamp; its bytes."""
    try:
        fd, opened = open_regular(file, may_open)
        try:
            size = opened.st_size
            if size > max_bytes:
                raise InvalidArgument(f"{file} is {size} bytes; the limit is {max_bytes}")
            # Its size and one byte more (a buffer of the limit's size would cost more than the read): bounded
            # even if the file grows meanwhile, and a file that grew is told by the byte more.
            raw = read_at(fd, size + 1, 0)
        finally:
            os.close(fd)
    except OSError as exc:
        raise InvalidArgument(f"{file} could not be read: {exc}", field="path") from exc
    if len(raw) > size:
        raise InvalidArgument(f"{file} changed while it was being read; retry once it is written")
    return parse_json(raw, str(file)), stamp_of(opened), raw


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: plain json.loads keeps the last of two equal keys, silently."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def parse_json(raw: bytes | str, what: str) -> Any:
    """Strict JSON: UTF-8, no repeated keys; `what` names the file (and part) in the errors."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{what} is not UTF-8: {exc}") from exc
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise InvalidArgument(f"{what} has the key {shown(exc.key)} more than once") from exc
    except (ValueError, RecursionError) as exc:  # ValueError: bad syntax, or an integer too long to convert
        raise InvalidArgument(f"{what} is not valid JSON: {shown(str(exc))}") from exc


def open_regular(file: Path, may_open: MayOpen | None) -> tuple[int, os.stat_result]:
    """Open a regular file for reading (a descriptor, read with positional reads: no buffered file object is
    needed for a few large reads), and what fstat said of it; a FIFO or device (which could block or never end) is
    refused."""
    # O_NONBLOCK so that opening a FIFO does not wait for a writer; it does not affect regular files.
    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if may_open is not None and not may_open(_opened_path(fd, file)):
            # Checked on what was opened, not on the name: a symlink swapped in after the path check (or
            # before a re-read from the disk tier) is caught here.
            raise PermissionDenied(
                f"{file} resolves outside the adapter folders this server allows (--lora-dirs)", field="path"
            )
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise InvalidArgument(f"{file} is not a regular file (a directory or a device?)", field="path")
        return fd, opened
    except BaseException:
        os.close(fd)
        raise


def read_at(fd: int, count: int, offset: int) -> bytes:
    """Up to `count` bytes from `offset` (fewer only at the end of the file)."""
    data = os.pread(fd, count, offset)
    if len(data) == count or not data:
        return data
    parts, got = [data], len(data)  # (a short read before the end: rare, but allowed)
    while got < count and (more := os.pread(fd, count - got, offset + got)):
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _opened_path(fd: int, file: Path) -> str:
    """The real path of an open file: from /proc where there is one (immune to later renames)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(file)


def _check_header(
    file: Path,
    raw: bytes,
    text: str,
    split: tuple[str, dict[str, str]] | None,
    size: int,
    data_start: int,
    max_tensors: int,
) -> SafetensorsHeader:
    """Parse and check a safetensors header (`raw`, `text` its UTF-8 decoding, empty if it has none, and `split`
    its split_metadata) against the file's size. Allocates no tensor. Headers in the form safetensors writes take
    the fast path (see canonical_header); any other gets the general judgement (parse_json says what is wrong
    with one not UTF-8)."""
    checked = canonical_header(text, split, size - data_start, max_tensors) if text else None
    if checked is not None:
        return SafetensorsHeader(file, *checked)
    return _judge_header(file, parse_json(raw, f"{file}: the safetensors header"), size, data_start, max_tensors)


def _judge_header(file: Path, header: Any, size: int, data_start: int, max_tensors: int) -> SafetensorsHeader:
    """Check a parsed safetensors header against the file's size, naming what is wrong."""
    if not isinstance(header, dict):
        raise InvalidArgument(f"{file} is not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidArgument(f"{file}: the safetensors __metadata__ must be an object of strings")
    if not header:
        raise InvalidArgument(f"{file} holds no tensors")
    if len(header) > max_tensors:
        raise InvalidArgument(f"{file} declares {len(header)} tensors; the limit is {max_tensors}{_WHY_LIMIT}")
    tensors = {key: _tensor_info(file, key, info) for key, info in header.items()}
    # The bytes the tensors declare; each float dtype's share of them.
    declared, sizes = 0, dict[str, int]()
    for t in tensors.values():
        declared += t.end - t.begin
        if t.dtype in FLOAT_DTYPES:
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.end - t.begin
    if declared > MAX_FILE_BYTES:
        raise InvalidArgument(
            f"{file} declares {declared} bytes of tensor data; adapters larger than {MAX_FILE_BYTES} are refused"
        )
    data_len = size - data_start
    key, last = max(tensors.items(), key=lambda item: item[1].end)
    if last.end > data_len:
        raise InvalidArgument(
            f"{file} is truncated or its offsets are out of range: tensor {shown(key)} has data_offsets "
            f"[{last.begin}, {last.end}] but the data region holds {data_len} bytes; expected a file of at least "
            f"{data_start + last.end} bytes, got {size}"
        )
    reach, reached_by = 0, ""  # the furthest end so far, and whose
    spans = sorted((t.begin, t.end, key) for key, t in tensors.items() if t.begin < t.end)
    for begin, end, key in spans:
        if begin < reach:
            raise InvalidArgument(
                f"{file}: tensors {shown(reached_by)} and {shown(key)} overlap (data_offsets up to {reach} "
                f"and from {begin})"
            )
        reach, reached_by = end, key
    if declared != data_len:
        # safetensors' own rule: the tensors tile the data region exactly, no gaps and nothing after them.
        raise InvalidArgument(
            f"{file} is not a readable safetensors file: its tensors cover {declared} of the {data_len} bytes of its "
            "data region (gaps or trailing bytes)"
        )
    main_float = max(sizes, key=lambda name: sizes[name]) if sizes else None
    return SafetensorsHeader(file=file, tensors=tensors, metadata=metadata, main_float=main_float)


def view_plan(infos: Mapping[str, TensorInfo]) -> ViewPlan:
    runs: dict[tuple[str, tuple[int, ...]], list[Any]] = {}  # (dtype, shape) -> [keys, first, step, last begin]
    finished: list[ViewRun] = []
    copies: list[str] = []
    for key, info in infos.items():
        dtype, shape, begin = info.dtype, info.shape, info.data_offsets.begin
        if begin % DTYPE_SIZES[dtype]:
            copies.append(key)
            continue
        run = runs.get((dtype, shape))
        if run is not None:
            keys, first, step, last = run
            if begin > last and (step is None or begin - last == step):
                keys.append(key)
                run[2], run[3] = begin - last, begin
                continue
            finished.append((dtype, shape, tuple(keys), first, step))
        runs[(dtype, shape)] = [[key], begin, None, begin]
    finished += [(dtype, shape, tuple(keys), first, step) for (dtype, shape), (keys, first, step, _) in runs.items()]
    return ViewPlan(tuple(finished), tuple(copies))


def _views(data: torch.Tensor, infos: Mapping[str, TensorInfo], plan: ViewPlan) -> dict[str, torch.Tensor]:
    """Every tensor of a data region (as `infos` declare them, `plan` their view_plan): views of it, and copies
    of the misaligned ones."""
    tensors: dict[str, torch.Tensor] = {}
    regions: dict[str, torch.Tensor] = {}
    for dtype, shape, keys, first, step in plan.runs:
        itemsize = DTYPE_SIZES[dtype]
        region = regions.get(dtype)
        if region is None:
            region = regions[dtype] = _as_dtype(data, dtype)
        strides = _contiguous_strides(shape)
        if step is None:
            tensors[keys[0]] = region.as_strided(shape, strides, first // itemsize)
        else:
            run_view = region.as_strided((len(keys), *shape), (step // itemsize, *strides), first // itemsize)
            tensors.update(zip(keys, run_view.unbind(0), strict=True))
    for key in plan.copies:
        info = infos[key]
        tensors[key] = data[info.begin : info.end].clone().view(_TORCH_DTYPES[info.dtype]).view(info.shape)
    return tensors


def _as_dtype(data: torch.Tensor, dtype: str) -> torch.Tensor:
    """A data region's bytes as elements of `dtype` (a trailing part element left out)."""
    return data[: data.numel() - data.numel() % DTYPE_SIZES[dtype]].view(_TORCH_DTYPES[dtype])


@functools.lru_cache(maxsize=4096)  # a file's shapes repeat (every layer of a kind has the same)
def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


def _tensor_info(file: Path, key: str, info: Any) -> TensorInfo:
    # A header holds thousands of these: a well-formed entry is taken in one cheap pass; any other is judged
    # by `_misdescribed`, which says what is wrong with it.
    if type(info) is dict and len(key) <= MAX_KEY_CHARS:
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if (
            type(shape) is list
            and type(offsets) is list
            and len(offsets) == 2
            and type(dtype) is str
            and dtype in DTYPE_SIZES
            and _naturals(shape)
            and _naturals(offsets)
            and offsets[0] <= offsets[1]
            and _nbytes(shape, DTYPE_SIZES[dtype]) == offsets[1] - offsets[0]
        ):
            return TensorInfo(dtype, tuple(shape), Span(offsets[0], offsets[1]))
    raise _misdescribed(file, key, info)


def _misdescribed(file: Path, key: str, info: Any) -> InvalidArgument:
    """What is wrong with a tensor's entry (one `_tensor_info` did not take)."""
    if len(key) > MAX_KEY_CHARS:
        return InvalidArgument(
            f"{file}: tensor name {shown(key)} is {len(key)} characters long; the limit is {MAX_KEY_CHARS}"
        )
    if not isinstance(info, dict):
        return InvalidArgument(f"{file}: tensor {shown(key)} is described by {shown(info)}, not an object")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        return InvalidArgument(
            f"{file}: tensor {shown(key)} has dtype {shown(dtype)}; allowed: {', '.join(DTYPE_SIZES)}"
        )
    shape = info.get("shape")
    if not isinstance(shape, list) or not _naturals(shape):
        return InvalidArgument(f"{file}: tensor {shown(key)} has shape {shown(shape)}; want a list of integers >= 0")
    offsets = info.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or not _naturals(offsets):
        return InvalidArgument(
            f"{file}: tensor {shown(key)} has data_offsets {shown(offsets)}; want [begin, end], two integers >= 0"
        )
    begin, end = offsets
    if begin > end:
        return InvalidArgument(
            f"{file}: tensor {shown(key)} has data_offsets [{begin}, {end}], which end before they begin"
        )
    needed = _nbytes(shape, DTYPE_SIZES[dtype])
    if needed != end - begin:
        shown_needed = "more than the size limit" if needed is None else f"{needed} bytes"
        return InvalidArgument(
            f"{file}: tensor {shown(key)} has data_offsets [{begin}, {end}] ({end - begin} bytes), but shape "
            f"{shown(shape)} of {dtype} needs {shown_needed}"
        )
    return InvalidArgument(f"{file}: tensor {shown(key)} is not a valid entry")


def _nbytes(shape: list[int], itemsize: int) -> int | None:
    """prod(shape) * itemsize, or None once it exceeds MAX_FILE_BYTES (huge dims must not cost time)."""
    if 0 in shape:
        return 0
    total = itemsize
    for dim in shape:
        total *= dim
        if total > MAX_FILE_BYTES:
            return None
    return total


def _naturals(values: list[Any]) -> bool:
    """Every value an integer >= 0 (not a bool, which Python counts as an int)."""
    return all(type(value) is int and value >= 0 for value in values)
