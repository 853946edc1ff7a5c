"""Adapter files on disk: which format a path holds (a PEFT folder, a diffusers LoRA file), and its config.

This module knows file formats, not the model: it returns the LoRA tensors keyed by module name, with the
scaling peft would give each module. Whether the modules fit the base model is judged by a `ModelFit` the
caller gives, from the header alone: everything that can be refused from a file's names, shapes, ranks,
sizes and config is refused before a byte of its tensor data is read. Every failure is an OmniError naming
the file, and holds no reference to tensors read before it (their memory is returned at once).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeGuard

import torch

from omni_grpc.engine.safetensors_reader import (
    MayOpen,
    SafetensorsFile,
    TensorInfo,
    open_safetensors,
    parse_json,
    read_json,
)
from omni_grpc.engine.types import AdapterFormat
from omni_grpc.errors import FailedPrecondition, InvalidArgument, NotFound, OmniError
from omni_grpc.quoting import shown

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
# The server flag that sets the reader's max_rank, named in the errors it causes.
MAX_RANK_FLAG = "--max-lora-rank"
_MODULE_KEY = re.compile(r"^[A-Za-z0-9_.]{1,256}$")
# alpha / r beyond this is no adapter anyone trained: refused as absurd (its product with a request's scale
# must stay well inside float16's range too).
MAX_SCALING = 1000.0

# Config fields whose non-neutral value changes the math in ways this engine does not apply.
_UNSUPPORTED_FEATURES: dict[str, tuple[Any, ...]] = {
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


@dataclass(frozen=True)
class AdapterLayout:
    """An adapter as its header and config describe it, before any tensor is read."""

    path: str
    format: AdapterFormat
    # Module name (relative to the denoiser) -> (lora_A, lora_B) as the header declares them.
    modules: dict[str, tuple[TensorInfo, TensorInfo]]
    # Module name -> alpha / r for that module (peft's rule, patterns included).
    scalings: dict[str, float]

    @property
    def nbytes(self) -> int:
        return sum(a.end - a.begin + b.end - b.begin for a, b in self.modules.values())


class ModelFit(Protocol):
    """What the base model accepts, judged from an adapter's layout before its tensors are read."""

    # The largest |weight| x scaling its dtype computes with safely; beyond it only overflow can come out.
    max_abs_weight: float

    def check(self, layout: AdapterLayout) -> None:
        """Raise an OmniError (FailedPrecondition, ResourceExhausted, ...) if the adapter cannot be loaded."""


@dataclass
class AdapterWeights:
    """A validated adapter read from disk, before it is attached to any model."""

    path: str
    format: AdapterFormat
    # Module name (relative to the denoiser) -> (lora_A weight, lora_B weight).
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    # The config's lora_alpha (modules may override it with alpha_pattern).
    alpha: float
    # target_modules as the adapter's own config names them (for display).
    target_modules: list[str]
    # Module name -> alpha / r for that module (peft's rule, patterns included).
    scalings: dict[str, float]

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.modules.values())

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.modules.values() for t in pair)


class AdapterReader:
    """Reads adapters: ranks up to `max_rank` (None: no limit), files only where `may_open` allows.

    `may_open` is asked about the real path of every file opened (PermissionDenied when it says no).
    `read` raises only InvalidArgument, FailedPrecondition, NotFound or PermissionDenied for bad input.
    """

    def __init__(
        self, *, max_rank: int | None = None, may_open: MayOpen | None = None, fit: ModelFit | None = None
    ) -> None:
        self.max_rank = max_rank
        self.may_open = may_open
        self.fit = fit

    def read(self, path: str) -> AdapterWeights:
        """The adapter at `path`: a PEFT folder, a folder with a diffusers file, or a .safetensors file."""
        if not path or "\0" in path:  # Path() would raise ValueError on a NUL byte
            raise InvalidArgument(f"adapter path {shown(path)} is empty or contains a NUL byte", field="path")
        try:
            return self._read(path)
        except OSError as exc:  # a name too long, a permission denied, a file vanishing mid-read, ...
            error: OmniError = InvalidArgument(f"adapter path {shown(path)} could not be read: {exc}", field="path")
        except OmniError as exc:
            error = exc
        # Raised without the frames it came through: they hold the tensors read so far, which must go now.
        error.__traceback__ = error.__context__ = error.__cause__ = None
        raise error

    def _read(self, path: str) -> AdapterWeights:
        p = Path(path)
        if not p.exists():
            raise NotFound(
                f"adapter path {shown(path)} does not exist on the server machine; adapters are read from the "
                "server's own filesystem, so the path must exist there (not on the client)",
                field="path",
            )
        if p.is_dir():
            if (p / DIFFUSERS_WEIGHTS).is_file() and not (p / PEFT_CONFIG).exists():
                return self._read_diffusers_file(p / DIFFUSERS_WEIGHTS, str(p))
            return self._read_peft_folder(p)
        if p.suffix in PICKLE_SUFFIXES:
            raise InvalidArgument(
                f"adapter file {shown(path)} is a pickle ({p.suffix}); only safetensors are loaded, because unpickling "
                "can run arbitrary code. Convert it with safetensors.torch.save_file.",
                field="path",
            )
        if p.suffix != ".safetensors":
            raise InvalidArgument(
                f"adapter path {shown(path)} is neither a PEFT folder ({PEFT_CONFIG} + {PEFT_WEIGHTS}) nor a "
                "diffusers .safetensors LoRA file",
                field="path",
            )
        return self._read_diffusers_file(p, str(p))

    def _read_peft_folder(self, folder: Path) -> AdapterWeights:
        config_path = folder / PEFT_CONFIG
        weights_path = folder / PEFT_WEIGHTS
        if not weights_path.is_file():
            pickled = [name for name in ("adapter_model.bin", "adapter_model.pt") if (folder / name).exists()]
            if pickled:
                raise InvalidArgument(
                    f"adapter folder {shown(str(folder))} has {pickled[0]} but no {PEFT_WEIGHTS}: pickled weights are "
                    "refused because unpickling can run arbitrary code; save the adapter with "
                    "safe_serialization=True",
                    field="path",
                )
        for p in (config_path, weights_path):
            if p.exists() and not p.is_file():
                raise InvalidArgument(f"{p} is not a regular file (a directory or a device?)", field="path")
        missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
        if missing:
            raise InvalidArgument(
                f"adapter folder {shown(str(folder))} is missing {' and '.join(missing)}; a PEFT adapter folder holds "
                f"{PEFT_CONFIG} and {PEFT_WEIGHTS}",
                field="path",
            )

        config = self._read_config(config_path)
        self._check_config(config, config_path)  # before the weights: a bad config costs no tensor read
        with open_safetensors(weights_path, self.may_open) as weights:
            self._check_ranks(weights.header.tensors, weights_path)
            infos: dict[str, TensorInfo] = {}
            for key, info in weights.header.tensors.items():
                if not key.startswith(PEFT_KEY_PREFIX):
                    raise InvalidArgument(
                        f"{weights_path}: key {shown(key)} is not in PEFT form "
                        f"('{PEFT_KEY_PREFIX}<module>.lora_A.weight')"
                    )
                infos[key.removeprefix(PEFT_KEY_PREFIX)] = info
            layout = self._layout(str(folder), AdapterFormat.PEFT, infos, config, config_path, weights.file)
            return self._load(weights, layout, config, prefix=PEFT_KEY_PREFIX)

    def _read_diffusers_file(self, file: Path, path: str) -> AdapterWeights:
        with open_safetensors(file, self.may_open) as weights:
            header = weights.header
            self._check_ranks(header.tensors, file)
            prefixes = {key.split(".", 1)[0] for key in header.tensors}
            foreign = sorted(prefixes - set(DENOISER_PREFIXES))
            if foreign:
                raise FailedPrecondition(
                    f"{file}: keys under {shown(foreign[0] + '.')} are not supported; only LoRA layers of the "
                    f"denoiser ({' or '.join(DENOISER_PREFIXES)}) can be applied (text-encoder LoRA is not served)"
                )
            if len(prefixes) != 1:
                raise InvalidArgument(f"{file}: keys mix the prefixes {sorted(prefixes)}")
            prefix = prefixes.pop() + "."
            infos = {key.removeprefix(prefix): info for key, info in header.tensors.items()}
            config: dict[str, Any] = {}
            raw = header.metadata.get(DIFFUSERS_METADATA_KEY)
            if raw:
                packed = parse_json(raw, f"{file}: metadata '{DIFFUSERS_METADATA_KEY}'")
                if not isinstance(packed, dict):
                    raise InvalidArgument(f"{file}: metadata '{DIFFUSERS_METADATA_KEY}' is not a JSON object")
                config = {k.removeprefix(prefix): v for k, v in packed.items() if k.startswith(prefix)}
            if "r" not in config:
                # Without a stored config diffusers assumes alpha == r; so do we, consistently.
                rank = max((info.shape[0] for key, info in infos.items() if key.endswith(".lora_A.weight")), default=1)
                config = {"r": rank, "lora_alpha": rank, **config}
            self._check_config(config, file)
            layout = self._layout(path, AdapterFormat.DIFFUSERS, infos, config, file, file)
            return self._load(weights, layout, config, prefix=prefix)

    def _layout(
        self,
        path: str,
        fmt: AdapterFormat,
        infos: dict[str, TensorInfo],
        config: dict[str, Any],
        config_source: Path,
        weights_file: Path,
    ) -> AdapterLayout:
        """The adapter from its header and a config that `_check_config` accepted; then the model's verdict."""
        modules = _pair_modules(infos, weights_file)
        layout = AdapterLayout(
            path=path, format=fmt, modules=modules, scalings=_scalings(modules, config, config_source)
        )
        if self.fit is not None:
            self.fit.check(layout)
        return layout

    def _load(
        self, weights: SafetensorsFile, layout: AdapterLayout, config: dict[str, Any], prefix: str
    ) -> AdapterWeights:
        """Read the tensors of a layout the model accepted, and check their values."""
        tensors = weights.read()
        bound = self.fit.max_abs_weight if self.fit is not None else _FLOAT32_SAFE
        modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for module in layout.modules:
            a, b = tensors[f"{prefix}{module}.lora_A.weight"], tensors[f"{prefix}{module}.lora_B.weight"]
            _check_values(weights.file, f"{prefix}{module}", a, b, layout.scalings[module], bound)
            modules[module] = (a, b)
        return AdapterWeights(
            path=layout.path,
            format=layout.format,
            modules=modules,
            alpha=float(config.get("lora_alpha", config["r"])),
            target_modules=_display_targets(config, modules),
            scalings=layout.scalings,
        )

    def _read_config(self, config_path: Path) -> dict[str, Any]:
        config = read_json(config_path, MAX_CONFIG_BYTES, self.may_open)
        if not isinstance(config, dict):
            raise InvalidArgument(f"{config_path} must hold a JSON object, not {type(config).__name__}")
        peft_type = config.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise InvalidArgument(f"{config_path}: peft_type {shown(peft_type)} is not supported, only LORA")
        return config

    def _check_ranks(self, infos: dict[str, TensorInfo], file: Path) -> None:
        """Ranks over the cap are refused from the header, before a tensor is read."""
        if self.max_rank is None:
            return
        for key, info in infos.items():
            if key.endswith(".lora_A.weight") and info.shape and info.shape[0] > self.max_rank:
                raise InvalidArgument(
                    f"{file}: tensor {shown(key)} has rank {info.shape[0]}, above this server's limit of "
                    f"{self.max_rank} (set with {MAX_RANK_FLAG})"
                )

    def _check_rank_cap(self, rank: int, what: str, source: Path) -> None:
        if self.max_rank is not None and rank > self.max_rank:
            raise InvalidArgument(
                f"{source}: {what} = {rank} is above this server's LoRA rank limit of {self.max_rank} "
                f"(set with {MAX_RANK_FLAG})"
            )

    def _check_config(self, config: dict[str, Any], source: Path) -> None:
        """The LoraConfig fields this engine uses, strictly typed; unsupported features are FailedPrecondition."""
        for name, neutral in _UNSUPPORTED_FEATURES.items():
            if name in config and config[name] not in neutral:
                raise FailedPrecondition(f"{source}: '{name}' = {shown(config[name])} is not supported by this server")
        rank = config.get("r")
        if not _is_positive_int(rank):
            raise InvalidArgument(f"{source}: 'r' must be a positive integer, got {shown(rank)}")
        self._check_rank_cap(rank, "'r'", source)
        alpha = config.get("lora_alpha", rank)
        if not _is_finite_number(alpha):
            raise InvalidArgument(f"{source}: 'lora_alpha' must be a finite number, got {shown(alpha)}")
        # null stands for "not set" in the configs peft writes, as an absent field does.
        targets = config.get("target_modules")
        if targets is not None and not (
            isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
        ):
            raise InvalidArgument(
                f"{source}: 'target_modules' must be a string or a list of strings, got {shown(targets)}"
            )
        rslora = config.get("use_rslora")
        if rslora is not None and not isinstance(rslora, bool):
            raise InvalidArgument(f"{source}: 'use_rslora' must be true or false, got {shown(rslora)}")
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
                    raise InvalidArgument(f"{source}: '{name}' {shown(pattern)} must be {wanted}, got {shown(value)}")
                if name == "rank_pattern":
                    self._check_rank_cap(value, f"'rank_pattern' {shown(pattern)}", source)
                if not _MODULE_KEY.match(pattern):
                    # peft reads these keys as regexes; running a file's own regex against its own module names
                    # could backtrack for hours with the GIL held, so only plain module names are accepted.
                    raise InvalidArgument(
                        f"{source}: '{name}' key {shown(pattern)} is not a module name ([A-Za-z0-9_.], up to 256 "
                        "characters); regular expressions are not accepted"
                    )


def _is_positive_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_finite_number(value: Any) -> TypeGuard[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer of hundreds of digits: no float holds it
        return False


# sqrt of float32's largest value: the default bound on |weight| x scaling when no model says otherwise.
_FLOAT32_SAFE = math.sqrt(float(torch.finfo(torch.float32).max))


def _pair_modules(infos: dict[str, TensorInfo], file: Path) -> dict[str, tuple[TensorInfo, TensorInfo]]:
    """Module -> (lora_A, lora_B) from the header's names and shapes; anything else is refused."""
    halves: dict[str, dict[str, TensorInfo]] = {}
    for key in sorted(infos):
        module, _, part = key.removesuffix(".weight").rpartition(".")
        if not key.endswith(".weight") or part not in ("lora_A", "lora_B") or not module:
            raise InvalidArgument(
                f"{file}: key {shown(key)} is not a LoRA weight ('<module>.lora_A.weight' / "
                "'<module>.lora_B.weight'); biases, DoRA magnitudes and other extras are not supported"
            )
        halves.setdefault(module, {})[part] = infos[key]
    modules: dict[str, tuple[TensorInfo, TensorInfo]] = {}
    for module, parts in halves.items():
        if set(parts) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(parts)).pop()
            raise InvalidArgument(f"{file}: module {shown(module)} has no {missing} weight")
        a, b = parts["lora_A"], parts["lora_B"]
        if len(a.shape) not in (2, 4) or len(b.shape) != len(a.shape) or a.shape[0] != b.shape[1]:
            raise InvalidArgument(
                f"{file}: module {shown(module)} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
                "which do not form a low-rank pair"
            )
        modules[module] = (a, b)
    return modules


def _scalings(
    modules: dict[str, tuple[TensorInfo, TensorInfo]], config: dict[str, Any], source: Path
) -> dict[str, float]:
    """alpha / r of every module (peft's rule, patterns included), each finite and not absurd."""
    rank, alpha = config["r"], config.get("lora_alpha", config["r"])
    scalings: dict[str, float] = {}
    for module, (a, _) in modules.items():
        module_rank = _pattern_value(config.get("rank_pattern") or {}, module, rank)
        pattern_alpha = _pattern_value(config.get("alpha_pattern") or {}, module, None)
        module_alpha = alpha if pattern_alpha is None else pattern_alpha
        if a.shape[0] != module_rank:
            raise InvalidArgument(
                f"{source}: module {shown(module)} has rank {a.shape[0]} but the config says r={module_rank}"
            )
        root = math.sqrt(module_rank) if config.get("use_rslora") else module_rank
        scaling = float(module_alpha) / root
        if not abs(scaling) <= MAX_SCALING:
            where = "'lora_alpha'" if pattern_alpha is None else "'alpha_pattern'"
            raise InvalidArgument(
                f"{source}: {where} gives module {shown(module)} the scaling alpha/r = {scaling:g}; a scaling beyond "
                f"+-{MAX_SCALING:g} is refused (it only yields overflow)"
            )
        scalings[module] = scaling
    return scalings


def _display_targets(config: dict[str, Any], modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
    """target_modules as the adapter's own config names them, or the module kinds it adapts."""
    declared = config.get("target_modules")
    if isinstance(declared, str):
        return [declared]
    if isinstance(declared, list):
        return sorted(declared)
    return sorted({module.rsplit(".", 1)[-1] for module in modules})


def _check_values(file: Path, module: str, a: torch.Tensor, b: torch.Tensor, scaling: float, bound: float) -> None:
    """No NaN or Inf, and no weight so large that (with its scaling) only overflow can come of it."""
    for part, tensor, factor in (("lora_A", a, 1.0), ("lora_B", b, max(1.0, abs(scaling)))):
        if tensor.numel() == 0:
            continue
        # One reduction that reads the tensor once and allocates nothing of its size; NaN propagates.
        peak = float(torch.linalg.vector_norm(tensor, ord=math.inf))
        name = shown(f"{module}.{part}.weight")
        if not math.isfinite(peak):
            raise InvalidArgument(f"{file}: tensor {name} contains NaN or Inf")
        if peak * factor > bound:
            raise InvalidArgument(
                f"{file}: tensor {name} holds values up to {peak:.3g} (x scaling {factor:g}); beyond {bound:.3g} the "
                "model's dtype can only overflow"
            )


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern rule for plain names: a key matches a dotted suffix of the module."""
    for key, value in patterns.items():  # every key checked to be a module name in _check_config
        if module_name == key or module_name.endswith("." + key):
            return value
    return default
