"""Read and validate adapter files: PEFT folders and diffusers LoRA files. Never pickle.

This module knows file formats, not the model: it returns the LoRA tensors keyed by module name plus the
LoraConfig that peft needs. Whether the modules fit the base model is checked in `lora_layers`.

Everything a file declares (header size, tensor count, dtypes, shapes, offsets, ranks, config fields) is checked
before any tensor data is read, and every failure is an OmniError naming the file: bad input never surfaces as
another exception.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from omni_grpc.engine.types import AdapterFormat
from omni_grpc.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# diffusers keeps the LoraConfig of each component in this safetensors metadata entry.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
# Prefixes of the denoiser's keys in diffusers LoRA files.
DENOISER_PREFIXES = ("transformer", "unet")
PEFT_KEY_PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1 << 20
# safetensors dtype names of the tensors an adapter may hold, with their sizes in bytes.
DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2}
ALLOWED_DTYPES = tuple(DTYPE_SIZES)
MAX_HEADER_BYTES = 16 << 20
MAX_ADAPTER_BYTES = 4 << 30
MAX_TENSORS = 65536
# The server flag that sets read_adapter's max_rank, named in the errors it causes.
MAX_RANK_FLAG = "--max-lora-rank"
# Longest name or value quoted in an error message; header strings can be megabytes long.
_MAX_SHOWN = 200
_MODULE_KEY = re.compile(r"^[A-Za-z0-9_.]{1,256}$")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")

# Config fields whose non-neutral value changes the math in ways this engine does not apply.
_UNSUPPORTED_FEATURES: dict[str, Any] = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, []),
    "layer_replication": (None, []),
    "fan_in_fan_out": (False, None),
    "trainable_token_indices": (None, [], {}),
    "target_parameters": (None, []),
    "alora_invocation_tokens": (None, []),
    "use_qalora": (False, None),
    "use_bdlora": (None, False),
    "arrow_config": (None,),
    "kasa_config": (None,),
    "monteclora_config": (None,),
}
# LoraConfig fields handed to peft; everything else in the config is informational.
_CONFIG_PASSTHROUGH = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora")


@dataclass
class AdapterWeights:
    """A validated adapter read from disk, before it is attached to any model."""

    path: str
    format: AdapterFormat
    # Module name (relative to the denoiser) -> (lora_A weight, lora_B weight).
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    # LoraConfig kwargs for peft; target_modules lists exactly the modules above.
    lora_config: dict[str, Any]
    # target_modules as the adapter's own config names them (for display).
    target_modules: list[str] = field(default_factory=list)
    # Module name -> alpha / r for that module (peft's rule, patterns included).
    scalings: dict[str, float] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.modules.values())

    @property
    def alpha(self) -> float:
        return float(self.lora_config["lora_alpha"])

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.modules.values() for t in pair)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors in the key form peft's set_peft_model_state_dict expects (no prefix)."""
        out: dict[str, torch.Tensor] = {}
        for module, (a, b) in self.modules.items():
            out[f"{module}.lora_A.weight"] = a
            out[f"{module}.lora_B.weight"] = b
        return out


def read_adapter(
    path: str, *, max_rank: int | None = None, may_open: Callable[[str], bool] | None = None
) -> AdapterWeights:
    """Read the adapter at `path` (a PEFT folder, a folder with a diffusers file, or a .safetensors file).

    `max_rank` refuses adapters of a higher rank, from the header and config alone; None means no limit.
    `may_open` is asked about the real path of every file opened (PermissionDenied when it says no).
    Raises only InvalidArgument, FailedPrecondition, NotFound or PermissionDenied for bad input.
    """
    if not path or "\0" in path:  # Path() would raise ValueError on a NUL byte
        raise InvalidArgument(f"adapter path {_shown(path)} is empty or contains a NUL byte", field="path")
    try:
        return _read_adapter(path, max_rank, may_open)
    except OSError as exc:  # a name too long, a permission denied, a file vanishing mid-read, ...
        raise InvalidArgument(f"adapter path '{path}' could not be read: {exc}", field="path") from exc


def _read_adapter(path: str, max_rank: int | None, may_open: Callable[[str], bool] | None) -> AdapterWeights:
    p = Path(path)
    if not p.exists():
        raise NotFound(
            f"adapter path '{path}' does not exist on the server machine; adapters are read from the "
            "server's own filesystem, so the path must exist there (not on the client)",
            field="path",
        )
    if p.is_dir():
        if (p / DIFFUSERS_WEIGHTS).is_file() and not (p / PEFT_CONFIG).exists():
            return _read_diffusers_file(p / DIFFUSERS_WEIGHTS, str(p), max_rank, may_open)
        return _read_peft_folder(p, max_rank, may_open)
    if p.suffix in PICKLE_SUFFIXES:
        raise InvalidArgument(
            f"adapter file '{path}' is a pickle ({p.suffix}); only safetensors are loaded, because unpickling "
            "can run arbitrary code. Convert it with safetensors.torch.save_file.",
            field="path",
        )
    if p.suffix != ".safetensors":
        raise InvalidArgument(
            f"adapter path '{path}' is neither a PEFT folder ({PEFT_CONFIG} + {PEFT_WEIGHTS}) nor a "
            "diffusers .safetensors LoRA file",
            field="path",
        )
    return _read_diffusers_file(p, str(p), max_rank, may_open)


def _read_peft_folder(folder: Path, max_rank: int | None, may_open: Callable[[str], bool] | None) -> AdapterWeights:
    config_path = folder / PEFT_CONFIG
    weights_path = folder / PEFT_WEIGHTS
    if not weights_path.is_file():
        pickled = [name for name in ("adapter_model.bin", "adapter_model.pt") if (folder / name).exists()]
        if pickled:
            raise InvalidArgument(
                f"adapter folder '{folder}' has {pickled[0]} but no {PEFT_WEIGHTS}: pickled weights are refused "
                "because unpickling can run arbitrary code; save the adapter with safe_serialization=True",
                field="path",
            )
    for p in (config_path, weights_path):
        if p.exists() and not p.is_file():
            raise InvalidArgument(f"{p} is not a regular file (a directory or a device?)", field="path")
    missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
    if missing:
        raise InvalidArgument(
            f"adapter folder '{folder}' is missing {' and '.join(missing)}; a PEFT adapter folder holds "
            f"{PEFT_CONFIG} and {PEFT_WEIGHTS}",
            field="path",
        )

    config = _read_config(config_path, may_open)
    _check_config(config, config_path, max_rank)  # before the weights: a bad config costs no tensor read
    tensors, _ = _read_safetensors(weights_path, max_rank, may_open)
    stripped: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_KEY_PREFIX):
            raise InvalidArgument(
                f"{weights_path}: key {_shown(key)} is not in PEFT form ('{PEFT_KEY_PREFIX}<module>.lora_A.weight')"
            )
        stripped[key.removeprefix(PEFT_KEY_PREFIX)] = tensor
    modules = _pair_modules(stripped, weights_path)
    return _build(str(folder), AdapterFormat.PEFT, modules, config, config_path)


def _read_diffusers_file(
    file: Path, path: str, max_rank: int | None, may_open: Callable[[str], bool] | None
) -> AdapterWeights:
    tensors, metadata = _read_safetensors(file, max_rank, may_open)
    prefixes = {key.split(".", 1)[0] for key in tensors}
    foreign = sorted(prefixes - set(DENOISER_PREFIXES))
    if foreign:
        raise FailedPrecondition(
            f"{file}: keys under {_shown(foreign[0] + '.')} are not supported; only LoRA layers of the denoiser "
            f"({' or '.join(DENOISER_PREFIXES)}) can be applied (text-encoder LoRA is not served)"
        )
    if len(prefixes) != 1:
        raise InvalidArgument(f"{file}: keys mix the prefixes {sorted(prefixes)}")
    prefix = prefixes.pop()
    stripped = {key.removeprefix(prefix + "."): tensor for key, tensor in tensors.items()}
    modules = _pair_modules(stripped, file)

    config: dict[str, Any] = {}
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if raw:
        packed = _parse_json(raw, f"{file}: metadata '{DIFFUSERS_METADATA_KEY}'")
        if not isinstance(packed, dict):
            raise InvalidArgument(f"{file}: metadata '{DIFFUSERS_METADATA_KEY}' is not a JSON object")
        config = {k.removeprefix(prefix + "."): v for k, v in packed.items() if k.startswith(prefix + ".")}
    if "r" not in config:
        # Without a stored config diffusers assumes alpha == r; so do we, consistently.
        rank = max(a.shape[0] for a, _ in modules.values())
        config = {"r": rank, "lora_alpha": rank, **config}
    _check_config(config, file, max_rank)
    return _build(path, AdapterFormat.DIFFUSERS, modules, config, file)


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: plain json.loads keeps the last of two equal keys, silently."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _parse_json(raw: bytes | str, what: str) -> Any:
    """Strict JSON: UTF-8, no repeated keys; `what` names the file (and part) in the errors."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{what} is not UTF-8: {exc}") from exc
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise InvalidArgument(f"{what} has the key {_shown(exc.key)} more than once") from exc
    except (ValueError, RecursionError) as exc:  # ValueError: bad syntax, or an integer too long to convert
        raise InvalidArgument(f"{what} is not valid JSON: {_shown(str(exc))}") from exc


def _open_regular(file: Path, may_open: Callable[[str], bool] | None) -> BinaryIO:
    """Open a regular file for reading; a FIFO or device (which could block or never end) is refused."""
    # O_NONBLOCK so that opening a FIFO does not wait for a writer; it does not affect regular files.
    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if may_open is not None and not may_open(_opened_path(fd, file)):
            # Checked on what was opened, not on the name: a symlink swapped in after the path check (or
            # before a re-read from the disk tier) is caught here.
            raise PermissionDenied(
                f"{file} resolves outside the adapter folders this server allows (--lora-dirs)", field="path"
            )
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidArgument(f"{file} is not a regular file (a directory or a device?)", field="path")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _opened_path(fd: int, file: Path) -> str:
    """The real path of an open file: from /proc where there is one (immune to later renames)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(file)


def _read_config(config_path: Path, may_open: Callable[[str], bool] | None) -> dict[str, Any]:
    try:
        with _open_regular(config_path, may_open) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_CONFIG_BYTES:
                raise InvalidArgument(f"{config_path} is {size} bytes; the limit is {MAX_CONFIG_BYTES}")
            raw = handle.read(MAX_CONFIG_BYTES + 1)  # bounded even if the file grows meanwhile
    except OSError as exc:
        raise InvalidArgument(f"{config_path} could not be read: {exc}", field="path") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidArgument(f"{config_path} is more than {MAX_CONFIG_BYTES} bytes, the limit")
    config = _parse_json(raw, str(config_path))
    if not isinstance(config, dict):
        raise InvalidArgument(f"{config_path} must hold a JSON object, not {type(config).__name__}")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise InvalidArgument(f"{config_path}: peft_type {_shown(peft_type)} is not supported, only LORA")
    return config


def _read_safetensors(
    file: Path, max_rank: int | None, may_open: Callable[[str], bool] | None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        data, header, metadata = _read_checked_bytes(file, max_rank, may_open)
    except OSError as exc:  # a permission denied, an I/O error, a path that changed type meanwhile, ...
        raise InvalidArgument(f"{file} could not be read: {exc}", field="path") from exc
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # whatever the parser says of these bytes, the file is bad
        raise InvalidArgument(f"{file} is not a readable safetensors file: {_shown(str(exc))}") from exc
    if not _all_finite(data, header, tensors):
        bad = next((key for key, t in tensors.items() if not torch.isfinite(t).all()), None)
        if bad is None:  # finite, but so large that its norm overflows: garbage all the same
            raise InvalidArgument(f"{file}: a tensor holds values too large to be LoRA weights")
        raise InvalidArgument(f"{file}: tensor {_shown(bad)} contains NaN or Inf")
    return tensors, metadata


def _read_checked_bytes(
    file: Path, max_rank: int | None, may_open: Callable[[str], bool] | None
) -> tuple[bytes, dict[str, Any], dict[str, str]]:
    """The whole file, read only after its header passed `_check_header`; with the header and metadata."""
    # One open file for the header and the data: what is loaded is what was checked, even if the path is
    # replaced or deleted meanwhile, and no mmap is left pointing at a file that may change later.
    with _open_regular(file, may_open) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > MAX_ADAPTER_BYTES:
            raise InvalidArgument(f"{file} is {size} bytes; adapters larger than {MAX_ADAPTER_BYTES} are refused")
        prefix = handle.read(8)
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
        raw = handle.read(length)
        if len(raw) != length:
            raise InvalidArgument(f"{file} is truncated: expected {length} header bytes, read {len(raw)}")
        header = _parse_json(raw, f"{file}: the safetensors header")
        metadata = _check_header(file, header, size, 8 + length, max_rank)
        handle.seek(0)
        data = handle.read(size)  # bounded by the size checked above, even if the file grew since
    if len(data) != size:
        raise InvalidArgument(f"{file} is truncated: it was {size} bytes when opened, but only {len(data)} were read")
    if data[: 8 + length] != prefix + raw:
        raise InvalidArgument(f"{file} changed while it was being read")
    return data, header, metadata


def _check_header(file: Path, header: Any, size: int, data_start: int, max_rank: int | None) -> dict[str, str]:
    """Check a parsed safetensors header against the file's size; return its metadata. Allocates no tensor."""
    if not isinstance(header, dict):
        raise InvalidArgument(f"{file} is not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidArgument(f"{file}: the safetensors __metadata__ must be an object of strings")
    if not header:
        raise InvalidArgument(f"{file} holds no tensors")
    if len(header) > MAX_TENSORS:
        raise InvalidArgument(f"{file} declares {len(header)} tensors; the limit is {MAX_TENSORS}")
    data_len = size - data_start
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        name = _shown(key)
        if not isinstance(info, dict):
            raise InvalidArgument(f"{file}: tensor {name} is described by {_shown(info)}, not an object")
        dtype = info.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise InvalidArgument(
                f"{file}: tensor {name} has dtype {_shown(dtype)}; allowed: {', '.join(ALLOWED_DTYPES)}"
            )
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(_is_natural(d) for d in shape):
            raise InvalidArgument(f"{file}: tensor {name} has shape {_shown(shape)}; want a list of integers >= 0")
        offsets = info.get("data_offsets")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_natural(o) for o in offsets):
            raise InvalidArgument(
                f"{file}: tensor {name} has data_offsets {_shown(offsets)}; want [begin, end], two integers >= 0"
            )
        begin, end = offsets
        if begin > end:
            raise InvalidArgument(
                f"{file}: tensor {name} has data_offsets [{begin}, {end}], which end before they begin"
            )
        needed = _nbytes(shape, DTYPE_SIZES[dtype])
        if needed != end - begin:
            shown_needed = "more than the size limit" if needed is None else f"{needed} bytes"
            raise InvalidArgument(
                f"{file}: tensor {name} has data_offsets [{begin}, {end}] ({end - begin} bytes), but shape "
                f"{_shown(shape)} of {dtype} needs {shown_needed}"
            )
        if max_rank is not None and key.endswith(".lora_A.weight") and shape and shape[0] > max_rank:
            raise InvalidArgument(
                f"{file}: tensor {name} has rank {shape[0]}, above this server's limit of {max_rank} "
                f"(set with {MAX_RANK_FLAG})"
            )
        spans.append((begin, end, key))
    declared = sum(end - begin for begin, end, _ in spans)
    if declared > MAX_ADAPTER_BYTES:
        raise InvalidArgument(
            f"{file} declares {declared} bytes of tensor data; adapters larger than {MAX_ADAPTER_BYTES} are refused"
        )
    begin, end, key = max(spans, key=lambda span: span[1])
    if end > data_len:
        raise InvalidArgument(
            f"{file} is truncated or its offsets are out of range: tensor {_shown(key)} has data_offsets "
            f"[{begin}, {end}] but the data region holds {data_len} bytes; expected a file of at least "
            f"{data_start + end} bytes, got {size}"
        )
    reach, reached_by = 0, ""  # the furthest end so far, and whose
    for begin, end, key in sorted(span for span in spans if span[0] < span[1]):
        if begin < reach:
            raise InvalidArgument(
                f"{file}: tensors {_shown(reached_by)} and {_shown(key)} overlap (data_offsets up to {reach} "
                f"and from {begin})"
            )
        reach, reached_by = end, key
    return metadata


def _nbytes(shape: list[int], itemsize: int) -> int | None:
    """prod(shape) * itemsize, or None once it exceeds MAX_ADAPTER_BYTES (huge dims must not cost time)."""
    if 0 in shape:
        return 0
    total = itemsize
    for dim in shape:
        total *= dim
        if total > MAX_ADAPTER_BYTES:
            return None
    return total


def _is_natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shown(value: Any) -> str:
    """repr of a value for an error message: quoted, escaped (no lone surrogates), and cut short."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "...(cut)"


def _all_finite(data: bytes, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bool:
    """True when no tensor holds NaN or Inf, in one vectorised pass where the dtypes allow it."""
    if all(info["dtype"] == "F32" for info in header.values()):
        # The data region is one packed float32 array: check it in one go.
        start = 8 + int.from_bytes(data[:8], "little")
        return bool(np.isfinite(np.frombuffer(data, dtype=np.float32, offset=start)).all())
    floats = [t.float() for t in tensors.values()]
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(floats))).all())  # noqa: SLF001 - one call


def _check_config(config: dict[str, Any], source: Path, max_rank: int | None) -> None:
    """The LoraConfig fields this engine uses, strictly typed; unsupported features are FailedPrecondition."""
    for name, neutral in _UNSUPPORTED_FEATURES.items():
        if name in config and config[name] not in neutral:
            raise FailedPrecondition(f"{source}: '{name}' = {_shown(config[name])} is not supported by this server")
    rank = config.get("r")
    if not _is_positive_int(rank):
        raise InvalidArgument(f"{source}: 'r' must be a positive integer, got {_shown(rank)}")
    _check_rank_cap(rank, "'r'", source, max_rank)
    alpha = config.get("lora_alpha", rank)
    if not _is_finite_number(alpha):
        raise InvalidArgument(f"{source}: 'lora_alpha' must be a finite number, got {_shown(alpha)}")
    # null stands for "not set" in the configs peft writes, as an absent field does.
    targets = config.get("target_modules")
    if targets is not None and not (
        isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise InvalidArgument(
            f"{source}: 'target_modules' must be a string or a list of strings, got {_shown(targets)}"
        )
    rslora = config.get("use_rslora")
    if rslora is not None and not isinstance(rslora, bool):
        raise InvalidArgument(f"{source}: 'use_rslora' must be true or false, got {_shown(rslora)}")
    for name, valid, wanted in (
        ("rank_pattern", _is_positive_int, "a positive integer"),
        ("alpha_pattern", _is_finite_number, "a finite number"),
    ):
        patterns = config.get(name)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise InvalidArgument(
                f"{source}: '{name}' must be an object of module patterns, got {type(patterns).__name__}"
            )
        for pattern, value in patterns.items():
            if not valid(value):
                raise InvalidArgument(f"{source}: '{name}' {_shown(pattern)} must be {wanted}, got {_shown(value)}")
            if name == "rank_pattern":
                _check_rank_cap(value, f"'rank_pattern' {_shown(pattern)}", source, max_rank)
            if not _MODULE_KEY.match(pattern):
                # peft reads these keys as regexes; running a file's own regex against its own module names
                # could backtrack for hours with the GIL held, so only plain module names are accepted.
                raise InvalidArgument(
                    f"{source}: '{name}' key {_shown(pattern)} is not a module name ([A-Za-z0-9_.], up to 256 "
                    "characters); regular expressions are not accepted"
                )


def _check_rank_cap(rank: int, what: str, source: Path, max_rank: int | None) -> None:
    if max_rank is not None and rank > max_rank:
        raise InvalidArgument(
            f"{source}: {what} = {rank} is above this server's LoRA rank limit of {max_rank} (set with {MAX_RANK_FLAG})"
        )


def _pair_modules(tensors: dict[str, torch.Tensor], file: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(tensors):
        match = _LORA_KEY.match(key)
        if match is None:
            raise InvalidArgument(
                f"{file}: key {_shown(key)} is not a LoRA weight ('<module>.lora_A.weight' / "
                "'<module>.lora_B.weight'); biases, DoRA magnitudes and other extras are not supported"
            )
        halves.setdefault(match["module"], {})[match["part"]] = tensors[key]
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, parts in halves.items():
        if set(parts) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(parts)).pop()
            raise InvalidArgument(f"{file}: module {_shown(module)} has no {missing} weight")
        a, b = parts["lora_A"], parts["lora_B"]
        if a.ndim not in (2, 4) or b.ndim != a.ndim or a.shape[0] != b.shape[1]:
            raise InvalidArgument(
                f"{file}: module {_shown(module)} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
                "which do not form a low-rank pair"
            )
        modules[module] = (a, b)
    return modules


def _build(
    path: str,
    fmt: AdapterFormat,
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
    config: dict[str, Any],
    source: Path,
) -> AdapterWeights:
    """Assemble the adapter from its tensors and a config that `_check_config` accepted."""
    rank, alpha = config["r"], config.get("lora_alpha", config["r"])
    scalings: dict[str, float] = {}
    for module, (a, _) in modules.items():
        module_rank = _pattern_value(config.get("rank_pattern") or {}, module, rank)
        module_alpha = _pattern_value(config.get("alpha_pattern") or {}, module, alpha)
        if a.shape[0] != module_rank:
            raise InvalidArgument(
                f"{source}: module {_shown(module)} has rank {a.shape[0]} but the config says r={module_rank}"
            )
        root = math.sqrt(module_rank) if config.get("use_rslora") else module_rank
        scalings[module] = module_alpha / root

    lora_config = {key: config[key] for key in _CONFIG_PASSTHROUGH if key in config}
    lora_config["lora_alpha"] = alpha
    lora_config["target_modules"] = sorted(modules)
    declared = config.get("target_modules")
    if isinstance(declared, str):
        shown = [declared]
    elif isinstance(declared, list):
        shown = sorted(declared)
    else:
        shown = sorted({module.rsplit(".", 1)[-1] for module in modules})
    return AdapterWeights(
        path=path, format=fmt, modules=modules, lora_config=lora_config, target_modules=shown, scalings=scalings
    )


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern rule for plain names: a key matches a dotted suffix of the module."""
    for key, value in patterns.items():  # every key checked to be a module name in _check_config
        if module_name == key or module_name.endswith("." + key):
            return value
    return default
