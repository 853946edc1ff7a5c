"""A PEFT LoraConfig as PEFT folders (adapter_config.json) and diffusers files (their metadata) carry it:
strictly checked, and turned into each module's scaling by peft's own rules (rank_pattern, alpha_pattern,
use_rslora). Features this engine does not apply are FAILED_PRECONDITION naming the field."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, TypeGuard

from omni_grpc.errors import FailedPrecondition, InvalidArgument
from omni_grpc.quoting import shown

# The server flag that sets the reader's max_rank, named in the errors it causes.
MAX_RANK_FLAG = "--max-lora-rank"
# alpha / r beyond this is no adapter anyone trained: refused as absurd (its product with a request's scale
# must stay well inside float16's range too).
MAX_SCALING = 1000.0
_MODULE_KEY = re.compile(r"^[A-Za-z0-9_.]{1,256}$")

# Config fields whose non-neutral value changes the math in ways this engine does not apply.
UNSUPPORTED_FEATURES: dict[str, tuple[Any, ...]] = {
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


def check_config(config: dict[str, Any], source: Path, max_rank: int | None) -> None:
    """The LoraConfig fields this engine uses, strictly typed; unsupported features are FailedPrecondition."""
    for name, neutral in UNSUPPORTED_FEATURES.items():
        if name in config and config[name] not in neutral:
            raise FailedPrecondition(f"{source}: '{name}' = {shown(config[name])} is not supported by this server")
    rank = config.get("r")
    if not _is_positive_int(rank):
        raise InvalidArgument(f"{source}: 'r' must be a positive integer, got {shown(rank)}")
    check_rank_cap(rank, "'r'", source, max_rank)
    alpha = config.get("lora_alpha", rank)
    if not _is_finite_number(alpha):
        raise InvalidArgument(f"{source}: 'lora_alpha' must be a finite number, got {shown(alpha)}")
    # null stands for "not set" in the configs peft writes, as an absent field does.
    targets = config.get("target_modules")
    if targets is not None and not (
        isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise InvalidArgument(f"{source}: 'target_modules' must be a string or a list of strings, got {shown(targets)}")
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
                check_rank_cap(value, f"'rank_pattern' {shown(pattern)}", source, max_rank)
            if not _MODULE_KEY.match(pattern):
                # peft reads these keys as regexes; running a file's own regex against its own module names
                # could backtrack for hours with the GIL held, so only plain module names are accepted.
                raise InvalidArgument(
                    f"{source}: '{name}' key {shown(pattern)} is not a module name ([A-Za-z0-9_.], up to 256 "
                    "characters); regular expressions are not accepted"
                )


def check_rank_cap(rank: int, what: str, source: Path, max_rank: int | None) -> None:
    if max_rank is not None and rank > max_rank:
        raise InvalidArgument(
            f"{source}: {what} = {rank} is above this server's LoRA rank limit of {max_rank} (set with {MAX_RANK_FLAG})"
        )


def module_scaling(config: dict[str, Any], module: str, rank: int, source: Path) -> float:
    """alpha / r of one module (peft's rule, patterns included), finite and not absurd; `rank` is its tensors'."""
    module_rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    pattern_alpha = _pattern_value(config.get("alpha_pattern") or {}, module, None)
    alpha = config.get("lora_alpha", config["r"]) if pattern_alpha is None else pattern_alpha
    if rank != module_rank:
        raise InvalidArgument(f"{source}: module {shown(module)} has rank {rank} but the config says r={module_rank}")
    root = math.sqrt(module_rank) if config.get("use_rslora") else module_rank
    scaling = float(alpha) / root
    if not abs(scaling) <= MAX_SCALING:
        where = "'lora_alpha'" if pattern_alpha is None else "'alpha_pattern'"
        raise InvalidArgument(
            f"{source}: {where} gives module {shown(module)} the scaling alpha/r = {scaling:g}; a scaling beyond "
            f"+-{MAX_SCALING:g} is refused (it only yields overflow)"
        )
    return scaling


def _is_positive_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_finite_number(value: Any) -> TypeGuard[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer of hundreds of digits: no float holds it
        return False


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern rule for plain names: a key matches a dotted suffix of the module."""
    for key, value in patterns.items():  # every key checked to be a module name in _check_config
        if module_name == key or module_name.endswith("." + key):
            return value
    return default
