"""Read and validate adapter files: PEFT folders and diffusers LoRA files. Never pickle.

This module knows file formats, not the model: it returns the LoRA tensors keyed by module name plus the
LoraConfig that peft needs. Whether the modules fit the base model is checked in `lora_layers`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from omni_grpc.engine.types import AdapterFormat
from omni_grpc.errors import FailedPrecondition, InvalidArgument, NotFound

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
# safetensors dtype names of the tensors an adapter may hold.
ALLOWED_DTYPES = ("F32", "F16", "BF16")
MAX_HEADER_BYTES = 16 << 20
MAX_ADAPTER_BYTES = 4 << 30
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


def read_adapter(path: str) -> AdapterWeights:
    """Read the adapter at `path` (a PEFT folder, a folder with a diffusers file, or a .safetensors file)."""
    try:
        return _read_adapter(path)
    except OSError as exc:  # a name too long, a permission denied, a file vanishing mid-read, ...
        raise InvalidArgument(f"adapter path '{path}' could not be read: {exc}", field="path") from exc


def _read_adapter(path: str) -> AdapterWeights:
    p = Path(path)
    if not p.exists():
        raise NotFound(
            f"adapter path '{path}' does not exist on the server machine; adapters are read from the "
            "server's own filesystem, so the path must exist there (not on the client)",
            field="path",
        )
    if p.is_dir():
        if (p / DIFFUSERS_WEIGHTS).is_file() and not (p / PEFT_CONFIG).exists():
            return _read_diffusers_file(p / DIFFUSERS_WEIGHTS, str(p))
        return _read_peft_folder(p)
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
    return _read_diffusers_file(p, str(p))


def _read_peft_folder(folder: Path) -> AdapterWeights:
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
    missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
    if missing:
        raise InvalidArgument(
            f"adapter folder '{folder}' is missing {' and '.join(missing)}; a PEFT adapter folder holds "
            f"{PEFT_CONFIG} and {PEFT_WEIGHTS}",
            field="path",
        )

    config = _read_config(config_path)
    tensors, _ = _read_safetensors(weights_path)
    stripped: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_KEY_PREFIX):
            raise InvalidArgument(
                f"{weights_path}: key '{key}' is not in PEFT form ('{PEFT_KEY_PREFIX}<module>.lora_A.weight')"
            )
        stripped[key.removeprefix(PEFT_KEY_PREFIX)] = tensor
    modules = _pair_modules(stripped, weights_path)
    return _build(str(folder), AdapterFormat.PEFT, modules, config, config_path)


def _read_diffusers_file(file: Path, path: str) -> AdapterWeights:
    tensors, metadata = _read_safetensors(file)
    prefixes = {key.split(".", 1)[0] for key in tensors}
    foreign = sorted(prefixes - set(DENOISER_PREFIXES))
    if foreign:
        raise FailedPrecondition(
            f"{file}: keys under '{foreign[0]}.' are not supported; only LoRA layers of the denoiser "
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
        try:
            packed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{file}: metadata '{DIFFUSERS_METADATA_KEY}' is not JSON: {exc}") from exc
        if not isinstance(packed, dict):
            raise InvalidArgument(f"{file}: metadata '{DIFFUSERS_METADATA_KEY}' is not a JSON object")
        config = {k.removeprefix(prefix + "."): v for k, v in packed.items() if k.startswith(prefix + ".")}
    if "r" not in config:
        # Without a stored config diffusers assumes alpha == r; so do we, consistently.
        rank = max(a.shape[0] for a, _ in modules.values())
        config = {"r": rank, "lora_alpha": rank, **config}
    return _build(path, AdapterFormat.DIFFUSERS, modules, config, file)


def _read_config(config_path: Path) -> dict[str, Any]:
    size = config_path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise InvalidArgument(f"{config_path} is {size} bytes; the limit is {MAX_CONFIG_BYTES}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidArgument(f"{config_path} must hold a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise InvalidArgument(f"{config_path}: peft_type '{peft_type}' is not supported, only LORA")
    return config


def _read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    size = file.stat().st_size
    if size > MAX_ADAPTER_BYTES:
        raise InvalidArgument(f"{file} is {size} bytes; adapters larger than {MAX_ADAPTER_BYTES} are refused")
    header = _read_header(file)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise InvalidArgument(f"{file}: the safetensors metadata is not an object")
    if not header:
        raise InvalidArgument(f"{file} holds no tensors")
    for key, info in header.items():  # checked from the header, before anything is allocated
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if dtype not in ALLOWED_DTYPES:
            raise InvalidArgument(f"{file}: tensor '{key}' has dtype {dtype}; allowed: {', '.join(ALLOWED_DTYPES)}")
    try:
        # One read into memory: no mmap left pointing at a file that may change or vanish later.
        data = file.read_bytes()
        tensors = load_safetensors(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InvalidArgument(f"{file} is not a readable safetensors file: {exc}") from exc
    if not _all_finite(data, header, tensors):
        bad = next((key for key, t in tensors.items() if not torch.isfinite(t).all()), None)
        if bad is None:  # finite, but so large that its norm overflows: garbage all the same
            raise InvalidArgument(f"{file}: a tensor holds values too large to be LoRA weights")
        raise InvalidArgument(f"{file}: tensor '{bad}' contains NaN or Inf")
    return tensors, metadata


def _all_finite(data: bytes, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bool:
    """True when no tensor holds NaN or Inf, in one vectorised pass where the dtypes allow it."""
    if all(info["dtype"] == "F32" for info in header.values()):
        # The data region is one packed float32 array: check it in one go.
        start = 8 + int.from_bytes(data[:8], "little")
        return bool(np.isfinite(np.frombuffer(data, dtype=np.float32, offset=start)).all())
    floats = [t.float() for t in tensors.values()]
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(floats))).all())  # noqa: SLF001 - one call


def _read_header(file: Path) -> dict[str, Any]:
    """The safetensors JSON header: 8 bytes of little-endian length, then that much JSON."""
    try:
        with file.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise InvalidArgument(f"{file} is not a safetensors file (shorter than its 8-byte header length)")
            length = int.from_bytes(prefix, "little")
            if length > MAX_HEADER_BYTES:
                raise InvalidArgument(f"{file}: safetensors header of {length} bytes exceeds {MAX_HEADER_BYTES}")
            raw = handle.read(length)
    except OSError as exc:
        raise InvalidArgument(f"{file} could not be read: {exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{file} is not a safetensors file: its header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise InvalidArgument(f"{file} is not a safetensors file: its header is not a JSON object")
    return header


def _pair_modules(tensors: dict[str, torch.Tensor], file: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(tensors):
        match = _LORA_KEY.match(key)
        if match is None:
            raise InvalidArgument(
                f"{file}: key '{key}' is not a LoRA weight ('<module>.lora_A.weight' / '<module>.lora_B.weight'); "
                "biases, DoRA magnitudes and other extras are not supported"
            )
        halves.setdefault(match["module"], {})[match["part"]] = tensors[key]
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, parts in halves.items():
        if set(parts) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(parts)).pop()
            raise InvalidArgument(f"{file}: module '{module}' has no {missing} weight")
        a, b = parts["lora_A"], parts["lora_B"]
        if a.ndim not in (2, 4) or b.ndim != a.ndim or a.shape[0] != b.shape[1]:
            raise InvalidArgument(
                f"{file}: module '{module}' has lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
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
    for name, neutral in _UNSUPPORTED_FEATURES.items():
        if name in config and config[name] not in neutral:
            raise FailedPrecondition(f"{source}: '{name}' = {config[name]!r} is not supported by this server")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidArgument(f"{source}: 'r' must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise InvalidArgument(f"{source}: 'lora_alpha' must be a finite number, got {alpha!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(name) or {}, dict):
            raise InvalidArgument(f"{source}: '{name}' must be an object")
    scalings: dict[str, float] = {}
    for module, (a, _) in modules.items():
        module_rank = _pattern_value(config.get("rank_pattern") or {}, module, rank)
        module_alpha = _pattern_value(config.get("alpha_pattern") or {}, module, alpha)
        if a.shape[0] != module_rank:
            raise InvalidArgument(
                f"{source}: module '{module}' has rank {a.shape[0]} but the config says r={module_rank}"
            )
        if not isinstance(module_alpha, (int, float)) or not math.isfinite(module_alpha):
            raise InvalidArgument(f"{source}: alpha of module '{module}' must be a finite number")
        root = math.sqrt(module_rank) if config.get("use_rslora") else module_rank
        scalings[module] = module_alpha / root

    lora_config = {key: config[key] for key in _CONFIG_PASSTHROUGH if key in config}
    lora_config["lora_alpha"] = alpha
    lora_config["target_modules"] = sorted(modules)
    declared = config.get("target_modules")
    if isinstance(declared, str):
        shown = [declared]
    elif isinstance(declared, list):
        shown = sorted(str(t) for t in declared)
    else:
        shown = sorted({module.rsplit(".", 1)[-1] for module in modules})
    return AdapterWeights(
        path=path, format=fmt, modules=modules, lora_config=lora_config, target_modules=shown, scalings=scalings
    )


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern rule: a pattern matches a dotted suffix of the module name."""
    for pattern, value in patterns.items():
        try:
            matched = re.match(rf"(.*\.)?({pattern})$", module_name)
        except re.error as exc:
            raise InvalidArgument(
                f"rank_pattern / alpha_pattern key {pattern!r} is not a valid pattern: {exc}"
            ) from exc
        if matched:
            return value
    return default
