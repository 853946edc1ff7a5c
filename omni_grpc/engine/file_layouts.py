"""The key layouts adapter files come in, told apart by their keys alone, and each file's tensors grouped
into the modules it adapts (`ModuleSource`), still from the header: no tensor is read here.

- PEFT (`PeftModel.save_pretrained`): `base_model.model.<module>.lora_A.weight`, config in
  adapter_config.json.
- diffusers (`save_lora_weights`): `<component>.<module>.lora_A.weight` for the denoiser (`transformer.`,
  `unet.`) and text encoders (`text_encoder.`, `text_encoder_2.`, ...), config in the file's metadata.
- diffusers' old attention-processor layout: `...attn1.processor.to_q_lora.down.weight` (with or without
  `unet.`), `...self_attn.to_q_lora.down.weight` for text encoders; no alpha (scale 1).
- Kohya / AUTOMATIC1111: `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha` (scale
  alpha / r per module, 1 without alpha), `lora_te_`, `lora_te1_`, `lora_te2_`, `lora_te3_` for text encoders;
  LoCon's `lora_mid` (a Tucker core) included.
- LyCORIS (the A1111 built-in kinds): the same names with LoHa (`hada_*`) or LoKr (`lokr_*`) tensors, also as
  `lycoris_<module>`.

What is refused is refused with the right words: DoRA magnitudes and the other LyCORIS kinds are
FAILED_PRECONDITION naming the feature and the key; keys that follow no layout name the first one and the
layouts tried.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import NamedTuple, Protocol

import torch

from omni_grpc.engine import adapter_math
from omni_grpc.engine.kohya_names import TEXT_ENCODER_PREFIXES, Target
from omni_grpc.engine.safetensors_format import TensorInfo
from omni_grpc.engine.types import AdapterFormat
from omni_grpc.errors import FailedPrecondition, InvalidArgument
from omni_grpc.quoting import shown

PEFT_KEY_PREFIX = "base_model.model."
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_", "lycoris_")
# A PEFT key's ending -> the role of its tensor.
_DOWN_END, _UP_END = ".lora_A.weight", ".lora_B.weight"
_PEFT_ROLES = {_DOWN_END: adapter_math.DOWN, _UP_END: adapter_math.UP}
TRIED = "PEFT, diffusers, diffusers' old attention-processor layout, Kohya/A1111 and LyCORIS (LoHa, LoKr)"
# Per-module tensors of kinds this engine does not apply, by what their key ends with.
_UNSUPPORTED_ROLES = {
    "dora_scale": "DoRA (a weight-decomposed magnitude, dora_scale)",
    "oft_blocks": "OFT/BOFT",
    "oft_diag": "OFT/BOFT",
    "oft_R": "OFT/BOFT",
    "rescale": "OFT/BOFT",
    "a1.weight": "GLoRA",
    "a2.weight": "GLoRA",
    "b1.weight": "GLoRA",
    "b2.weight": "GLoRA",
    "on_input": "(IA)^3",
    "weight": "(IA)^3",
    "diff": "a full weight difference (LyCORIS 'full')",
    "diff_b": "a full bias difference",
    "w_norm": "norm-layer tuning",
    "b_norm": "norm-layer tuning",
    "bias_indices": "bias tuning",
    "bias_values": "bias tuning",
    "lora_up.bias": "biases",
    "lora_down.bias": "biases",
}


class ModuleSource(NamedTuple):
    """One module of a file: its algorithm, its tensors by role, how it is scaled, where its delta goes. (A
    named tuple: a file has hundreds, made at every load of a new layout.)"""

    name: str  # as the file names it
    algorithm: str  # lora | loha | lokr
    keys: dict[str, str]  # role -> the file's key
    # alpha / r from a config (PEFT, diffusers); None: from the module's own alpha tensor (Kohya), else 1.
    scaling: float | None
    alpha_key: str | None
    targets: tuple[Target, ...]


class Naming(Protocol):
    """What the model tells the layouts: its denoiser's component, the components adapters may adapt, and the
    modules Kohya names stand for."""

    @property
    def denoiser(self) -> str: ...

    @property
    def components(self) -> Collection[str]: ...

    def kohya_targets(self, names: Collection[str]) -> Mapping[str, tuple[Target, ...]]: ...


class NoModel:
    """The naming of a read without a model: PEFT and diffusers files only."""

    denoiser = "transformer"
    components = ("transformer", "transformer_2", "unet", "text_encoder", "text_encoder_2", "text_encoder_3")

    def kohya_targets(self, names: Collection[str]) -> Mapping[str, tuple[Target, ...]]:
        raise FailedPrecondition("Kohya and LyCORIS files name modules of a model: load them into one")


def kind_of(keys: Collection[str], in_peft_folder: bool) -> AdapterFormat | None:
    """Which layout these keys follow (None: none)."""
    if in_peft_folder:
        return AdapterFormat.PEFT
    first = next(iter(keys), "")
    if any(key.startswith(KOHYA_PREFIXES) for key in keys):
        roles = {key.split(".", 1)[1] if "." in key else "" for key in keys}
        lycoris = any(role.startswith(("hada_", "lokr_")) for role in roles)
        return AdapterFormat.LYCORIS if lycoris else AdapterFormat.KOHYA
    if any("_lora.down." in key or "_lora.up." in key or ".lora.down." in key for key in keys):
        return AdapterFormat.DIFFUSERS_OLD
    if first.endswith((".lora_A.weight", ".lora_B.weight")):
        return AdapterFormat.DIFFUSERS
    return None


def peft_sources(
    infos: Mapping[str, TensorInfo], file: Path, component: str, prefix: str = PEFT_KEY_PREFIX
) -> list[ModuleSource]:
    """`<prefix><module>.lora_A.weight` / `.lora_B.weight` pairs of one component (scaled later by the config)."""
    keys = sorted(infos)
    modules = paired_modules(keys, prefix)
    if modules is None:  # something else than whole pairs: judged key by key, for the message
        return _judged_peft_sources(keys, file, component, prefix)
    down, up = adapter_math.DOWN, adapter_math.UP
    return [
        ModuleSource(module, "lora", {down: a, up: b}, None, None, (Target(component, module),))
        for module, a, b in zip(modules, keys[0::2], keys[1::2], strict=True)
    ]


def paired_modules(keys: list[str], prefix: str) -> list[str] | None:
    """The modules of sorted keys that are all `<prefix><module>.lora_A.weight` each followed by the same module's
    `.lora_B.weight`, as PEFT writes them (None for anything else). Judged in bulk, a few passes in C: a layout
    not seen before has hundreds of keys, and a Python step per key cost more than reading a small adapter."""
    downs, ups = keys[0::2], keys[1::2]
    start, end = len(prefix), -len(_DOWN_END)
    modules = [key[start:end] for key in downs]
    if (
        len(downs) != len(ups)
        or "" in modules  # (a key that is no more than prefix and ending)
        or [prefix + module + _DOWN_END for module in modules] != downs
        or [prefix + module + _UP_END for module in modules] != ups
    ):
        return None
    return modules


def _judged_peft_sources(keys: list[str], file: Path, component: str, prefix: str) -> list[ModuleSource]:
    """`peft_sources` key by key, refusing the first key that is no PEFT key and a module without both halves."""
    halves: dict[str, dict[str, str]] = {}
    start, end = len(prefix), -len(_DOWN_END)
    for key in keys:
        role = _PEFT_ROLES.get(key[end:])
        if role is None or len(key) <= start - end or not key.startswith(prefix):  # no module name, or no role
            raise _not_a_peft_key(file, key, prefix)
        halves.setdefault(key[start:end], {})[role] = key
    sources = []
    for module, roles in halves.items():
        if len(roles) != 2:
            missing = "lora_B" if adapter_math.DOWN in roles else "lora_A"
            raise InvalidArgument(f"{file}: module {shown(module)} has no {missing} weight")
        sources.append(ModuleSource(module, "lora", roles, None, None, (Target(component, module),)))
    return sources


def _not_a_peft_key(file: Path, key: str, prefix: str) -> InvalidArgument | FailedPrecondition:
    if not key.startswith(prefix):
        return InvalidArgument(f"{file}: key {shown(key)} is not in the form '{prefix}<module>.lora_A.weight'")
    if "lora_magnitude_vector" in key:
        return FailedPrecondition(
            f"{file}: {shown(key)} is DoRA (a magnitude vector), which this server does not apply"
        )
    return InvalidArgument(
        f"{file}: key {shown(key)} is not a LoRA weight ('<module>.lora_A.weight' / '<module>.lora_B.weight'); "
        "biases, DoRA magnitudes and other extras are not supported"
    )


def old_diffusers_sources(infos: Mapping[str, TensorInfo], file: Path, naming: Naming) -> list[ModuleSource]:
    """diffusers' attention-processor keys, renamed by diffusers' own converters to the modules they load."""
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    by_component: dict[str, dict[str, str]] = {}
    for key in infos:
        head, _, rest = key.partition(".")
        if head in ("unet", "text_encoder", "text_encoder_2"):
            by_component.setdefault(head, {})[rest] = key
        else:  # no prefix: the UNet, as those files were written
            by_component.setdefault("unet", {})[key] = key
    sources: list[ModuleSource] = []
    for component, keys in by_component.items():
        convert: Converter = (
            convert_unet_state_dict_to_peft
            if component == "unet"
            else lambda state: convert_state_dict_to_peft(
                convert_state_dict_to_diffusers(state, original_type=StateDictType.DIFFUSERS_OLD),
                original_type=StateDictType.DIFFUSERS,
            )
        )
        renamed = _renamed(keys, convert)
        target_component = naming.denoiser if component == "unet" else component
        for key, original in renamed.items():
            if key.endswith(".lora_A.weight"):
                module = key.removesuffix(".lora_A.weight")
                up = renamed.get(f"{module}.lora_B.weight")
                if up is None:
                    raise InvalidArgument(f"{file}: {shown(original)} has no matching up weight")
                sources.append(
                    ModuleSource(
                        module,
                        "lora",
                        {"lora_down.weight": original, "lora_up.weight": up},
                        1.0,
                        None,
                        (Target(target_component, module),),
                    )
                )
            elif not key.endswith(".lora_B.weight"):
                raise InvalidArgument(f"{file}: key {shown(original)} is not a LoRA weight of the old diffusers layout")
    return sources


def kohya_sources(infos: Mapping[str, TensorInfo], file: Path, naming: Naming) -> list[ModuleSource]:
    """Kohya / LyCORIS modules, grouped by name, each mapped to the modules it adapts."""
    grouped: dict[str, dict[str, str]] = {}
    for key in infos:
        name, _, role = key.partition(".")
        if not name.startswith(KOHYA_PREFIXES):
            raise InvalidArgument(
                f"{file}: key {shown(key)} follows no adapter layout beside its Kohya keys "
                f"({', '.join(KOHYA_PREFIXES)})"
            )
        _refuse_role(file, key, role)
        grouped.setdefault(name, {})[role] = key
    targets = naming.kohya_targets(grouped)
    sources = []
    for name, roles in grouped.items():
        alpha_key = roles.pop("alpha", None)
        scale_key = roles.pop("scale", None)
        if scale_key is not None:
            raise FailedPrecondition(
                f"{file}: {shown(scale_key)} (a fixed scale that overrides alpha) is not supported"
            )
        algorithm = adapter_math.algorithm_of(list(roles))
        if algorithm is None:
            raise InvalidArgument(
                f"{file}: module {shown(name)} has the tensors {shown(sorted(roles))}, which are no LoRA, LoHa or "
                "LoKr module"
            )
        mapped = targets.get(name)
        if mapped is None:
            component = _text_encoder_of(name)
            if component is not None and component not in naming.components:
                raise FailedPrecondition(
                    f"adapter {shown(str(file))} does not fit the base model: module {shown(name)} adapts "
                    f"{component}, which this model does not have (it has {', '.join(sorted(naming.components))})"
                )
            raise FailedPrecondition(
                f"adapter {shown(str(file))} does not fit the base model: module {shown(name)} names no module of it"
            )
        sources.append(ModuleSource(name, algorithm, roles, None, alpha_key, mapped))
    return sources


def _text_encoder_of(name: str) -> str | None:
    """The text encoder a Kohya name's prefix stands for ("lora_te2_..." -> "text_encoder_2")."""
    prefix = name.split("_", 2)
    return TEXT_ENCODER_PREFIXES.get("_".join(prefix[:2])) if len(prefix) == 3 else None


def into_expert(sources: Collection[ModuleSource], denoiser: str, expert: str, file: Path) -> tuple[ModuleSource, ...]:
    """The sources with the denoiser's modules moved into another expert of the same architecture (a Wan 2.2
    LoRA is trained for one expert, and its file names the default one, as diffusers' `load_into_transformer_2`)."""
    moved = []
    for source in sources:
        if any(target.component == expert for target in source.targets):
            raise InvalidArgument(
                f"{file}: module {shown(source.name)} already names {expert}; a file that names its experts itself "
                "loads without an expert"
            )
        targets = tuple(
            target._replace(component=expert) if target.component == denoiser else target for target in source.targets
        )
        moved.append(source._replace(targets=targets))
    return tuple(moved)


def unknown_layout(file: Path, keys: Collection[str]) -> InvalidArgument:
    first = next(iter(sorted(keys)), "")
    return InvalidArgument(
        f"{file}: its keys follow no adapter layout this server reads (first: {shown(first)}; tried {TRIED})"
    )


def _refuse_role(file: Path, key: str, role: str) -> None:
    feature = _UNSUPPORTED_ROLES.get(role)
    if feature is not None:
        raise FailedPrecondition(f"{file}: {shown(key)} is {feature}, which this server does not apply")


Converter = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _renamed(keys: Mapping[str, str], convert: Converter) -> dict[str, str]:
    """The keys as a diffusers converter renames them -> the file's keys. The converters only rename, keeping
    the very tensor objects: placeholders that carry nothing but their identity tell which key became which."""
    placeholders = {name: torch.empty(0, device="meta") for name in keys}
    original = {id(tensor): keys[name] for name, tensor in placeholders.items()}
    return {name: original[id(tensor)] for name, tensor in convert(placeholders).items()}
