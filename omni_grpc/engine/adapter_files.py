"""Adapter files on disk: which layout a path holds (a PEFT folder, a diffusers file, a Kohya/A1111 or LyCORIS
file, diffusers' old attention-processor file), its config, and its tensors as exact low-rank pairs.

This module knows file formats, not the model: the model's part is a `ModelFit` the caller gives. It names
the components a file may adapt and the modules Kohya names stand for (`Naming`), and judges the layout from
the header alone: everything that can be refused from a file's names, shapes, ranks, sizes and config is
refused before a byte of its tensor data is read. What is read comes back as `AdapterWeights`: one pair
(A, B) per adapted module of each component, delta W = scaling x B @ A, whatever the file's algorithm.
Every failure is an OmniError naming the file, and holds no reference to tensors read before it (their
memory is returned at once).
"""

from __future__ import annotations

import errno
import math
import os
import stat
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from operator import itemgetter
from pathlib import Path
from typing import Any, Protocol

import numpy
import torch

from omni_grpc.engine import adapter_math, file_layouts, peft_config
from omni_grpc.engine.adapter_math import DOWN, UP, ModuleFit, Shape
from omni_grpc.engine.file_layouts import ModuleSource, Naming, NoModel
from omni_grpc.engine.kohya_names import Target
from omni_grpc.engine.memo import Memo
from omni_grpc.engine.safetensors_format import FLOAT_DTYPES, TensorInfo
from omni_grpc.engine.safetensors_reader import (
    MAX_TENSORS,
    MEMO_HEADER_BYTES,
    FileStamp,
    HeaderMemo,
    MayOpen,
    SafetensorsFile,
    current_stamp,
    open_safetensors,
    parse_json,
    paused_gc,
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
MAX_CONFIG_BYTES = 1 << 20
# alpha / r beyond this is no adapter anyone trained (see peft_config).
MAX_SCALING = peft_config.MAX_SCALING
MAX_RANK_FLAG = peft_config.MAX_RANK_FLAG
# Module verdicts a LayoutMemo keeps (see LayoutMemo.modules): more than any model has modules.
MODULE_VERDICTS = 16384
# One adapted module of one component of the pipeline: ("unet", "mid_block.attentions.0.proj_in").
ModuleKey = tuple[str, str]
# What a label in a magnitude check renders as: before + the quoted name + after (made only on failure).
Label = tuple[str, str, str]


@dataclass(frozen=True)
class AdapterLayout:
    """An adapter as its header and config describe it, before any tensor is read."""

    path: str
    format: AdapterFormat
    file: Path
    sources: tuple[ModuleSource, ...]
    infos: Mapping[str, TensorInfo]
    # The file's tensor data: what reading it allocates.
    nbytes: int

    def shapes(self, source: ModuleSource) -> dict[str, Shape]:
        return {role: self.infos[key].shape for role, key in source.keys.items()}


@dataclass(frozen=True)
class FittedLayout:
    """A layout the model accepted, and what reading it makes: the same for every file of the same tensor section
    and config (see LayoutMemo)."""

    layout: AdapterLayout
    # Per module (by its name in the file): the weight its delta is for, and its exact pair's shapes.
    fits: Mapping[str, ModuleFit]
    # Per source, in order: the rank it declares.
    ranks: tuple[int, ...]
    # What a load allocates: the file's tensors as read, and their exact pairs in float32.
    nbytes: int
    alpha: float | None
    targets: tuple[str, ...]
    # Set when every module's exact pair is the file's own two float32 tensors as they are (PEFT, diffusers):
    # what a load takes, worked out once per layout (a small adapter's hundreds of modules, each judged at
    # every load, cost more than its read).
    own: OwnPairs | None = None


# How a load takes one module's exact pair straight from the file: the keys of its two tensors, the module it
# goes into, its scaling.
OwnPair = tuple[str, str, ModuleKey, float]


@dataclass(frozen=True)
class OwnPairs:
    """Every module of a layout as an OwnPair, in columns; `factor`: the largest |scaling|, at least 1."""

    downs: tuple[str, ...]
    ups: tuple[str, ...]
    modules: tuple[ModuleKey, ...]
    scalings: tuple[float, ...]
    factor: float


# (layout kind, the header's tensor section, the data region's length, config, expert) -> the verdict for them.
LayoutKey = tuple[str, str, int, str | bytes, str | None]


# A PEFT module as a verdict on it depends on: its name, its two tensors' dtypes and shapes, the config's
# (r, lora_alpha, use_rslora), the expert -> its source (as configured and placed), fit and declared rank.
ScalingKey = tuple[Any, Any, bool]  # (r, lora_alpha, use_rslora): all a config without patterns scales by
ModuleVerdictKey = tuple[str, str, Shape, str, Shape, ScalingKey, str | None]
# (its source, fit, declared rank, what making its exact pair allocates, how a load takes the pair when the file
# holds it as it is)
JudgedModule = tuple[ModuleSource, ModuleFit, int, int, OwnPair | None]


class LayoutMemo:
    """What one engine's model said of the layouts it accepted, and the headers checked on the way: fine-tunes
    of one recipe share their headers' tensor sections byte for byte (not always their metadata: Kohya's scripts
    and other trainers write theirs per run, and it is judged at every load), and judging a layout again costs
    more than a small adapter's read. Only what the tensor section and config decide is kept, for sections (and,
    in layouts, sections and configs together) up to MEMO_HEADER_BYTES characters (so at most `entries` x that
    many characters of keys in each memo); every load still opens, reads and checks its own data. Module verdicts
    (`modules`) are kept only for modules the model accepted, at most MODULE_VERDICTS of them (about 1.5 KB
    each)."""

    def __init__(self, entries: int = 32) -> None:
        self.headers: HeaderMemo = Memo(entries)
        self.fitted: Memo[LayoutKey, FittedLayout] = Memo(entries)
        # Modules, whatever layout they came in: adapters for one model name its modules, a few hundred to a
        # few thousand, in many combinations (attention only, attention and feed-forward, ...): a layout of
        # modules judged before is put together from their verdicts, not judged whole again.
        self.modules: Memo[ModuleVerdictKey, JudgedModule] = Memo(MODULE_VERDICTS)


class ModelFit(Protocol):
    """What the base model accepts, judged from an adapter's layout before its tensors are read."""

    # The largest |weight| x scaling its dtype computes with safely; beyond it only overflow can come out.
    max_abs_weight: float
    # The most tensors a file for it can hold (TENSORS_PER_LAYER per layer it can adapt): more is refused before
    # the header is parsed.
    max_tensors: int
    naming: Naming

    def check(self, layout: AdapterLayout) -> dict[str, ModuleFit]:
        """How each module of the file (by its name in the file) goes into the model; raise an OmniError
        (FailedPrecondition, ...) if it cannot be loaded. A pure verdict: the same layout always gets the same
        one."""

    def reserve(self, nbytes: int, what: str) -> None:
        """Room for a load's `nbytes`, before they are read (ResourceExhausted when there is none)."""


@dataclass
class AdapterWeights:
    """A validated adapter read from disk, before it is attached to any model."""

    path: str
    format: AdapterFormat
    # (component, module) -> the exact pair (A, B) of its delta, float32: delta W = scaling x B @ A.
    modules: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]
    scalings: dict[ModuleKey, float]
    # The config's lora_alpha; for per-module alphas (Kohya) the most common one.
    alpha: float
    # The rank the file declares (the largest over its modules).
    rank: int
    # target_modules as the adapter's own config names them, else the kinds of module it adapts.
    target_modules: list[str]
    # Each file read, with the version of it that was read: a changed file is told by it later.
    files: tuple[tuple[str, FileStamp], ...]
    # LoKr modules of Linear layers: their Kronecker factors too, cheaper to apply than their pair.
    kron: dict[ModuleKey, adapter_math.Kron] = field(default_factory=dict)

    @property
    def components(self) -> list[str]:
        return sorted({component for component, _ in self.modules})

    @property
    def size_bytes(self) -> int:
        factors = (t for kron in self.kron.values() for t in kron if t is not None)
        return sum(t.nbytes for pair in self.modules.values() for t in pair) + sum(t.nbytes for t in factors)


class AdapterReader:
    """Reads adapters: ranks up to `max_rank` (None: no limit), files only where `may_open` allows.

    `may_open` is asked about the real path of every file opened (PermissionDenied when it says no).
    `read` raises only InvalidArgument, FailedPrecondition, NotFound or PermissionDenied for bad input
    (ResourceExhausted from a fit's memory budget).
    """

    def __init__(
        self,
        *,
        max_rank: int | None = None,
        may_open: MayOpen | None = None,
        fit: ModelFit | None = None,
        expert: str | None = None,
        memo: LayoutMemo | None = None,
    ) -> None:
        self.max_rank = max_rank
        self.may_open = may_open
        self.fit = fit
        # Verdicts of `fit` (and checked headers) by what decided them (the headers' tensor sections, the
        # configs): one memo per model and max_rank, shared by its readers.
        self.memo = memo
        self.naming: Naming = fit.naming if fit is not None else NoModel()
        self.max_tensors = fit.max_tensors if fit is not None else MAX_TENSORS
        # The denoiser the file's denoiser modules go into (Wan 2.2's transformer_2); None: the model's first.
        self.expert = expert

    def read(self, path: str) -> AdapterWeights:
        """The adapter at `path`: a PEFT folder, a folder with a diffusers file, or a .safetensors file."""
        if not path or "\0" in path:  # Path() would raise ValueError on a NUL byte
            raise InvalidArgument(f"adapter path {shown(path)} is empty or contains a NUL byte", field="path")
        try:
            with paused_gc():  # a load makes thousands of small objects, layouts of thousands of modules more
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
        # A folder's config first: a PEFT folder, the common case, is answered in one stat. (A path named like
        # a file is stat'ed itself first, for the same reason.)
        config_mode = _mode(p / PEFT_CONFIG) if p.suffix != ".safetensors" else None
        if _is_file(config_mode):
            return self._read_peft_folder(p, config_mode)
        mode = _mode(p)
        if mode is None:
            raise NotFound(
                f"adapter path {shown(path)} does not exist on the server machine; adapters are read from the "
                "server's own filesystem, so the path must exist there (not on the client)",
                field="path",
            )
        if stat.S_ISDIR(mode):
            if p.suffix == ".safetensors":  # (a folder named like a file)
                config_mode = _mode(p / PEFT_CONFIG)
            if config_mode is None and _is_file(_mode(p / DIFFUSERS_WEIGHTS)):
                return self._read_file(p / DIFFUSERS_WEIGHTS, str(p))
            return self._read_peft_folder(p, config_mode)
        if p.suffix in PICKLE_SUFFIXES:
            raise InvalidArgument(
                f"adapter file {shown(path)} is a pickle ({p.suffix}); only safetensors are loaded, because unpickling "
                "can run arbitrary code. Convert it with safetensors.torch.save_file.",
                field="path",
            )
        if p.suffix != ".safetensors":
            raise InvalidArgument(
                f"adapter path {shown(path)} is neither a PEFT folder ({PEFT_CONFIG} + {PEFT_WEIGHTS}) nor a "
                ".safetensors LoRA file (diffusers, Kohya/A1111, LyCORIS)",
                field="path",
            )
        return self._read_file(p, str(p))

    # ---- layouts ------------------------------------------------------------------------------------

    def _read_peft_folder(self, folder: Path, config_mode: int | None) -> AdapterWeights:
        config_path = folder / PEFT_CONFIG
        weights_path = folder / PEFT_WEIGHTS
        if not _is_file(config_mode):
            _refuse_folder(folder, config_mode)  # (raises: the config is missing or no regular file)
        config, config_stamp, config_bytes = read_json(config_path, MAX_CONFIG_BYTES, self.may_open)
        config = _lora_config(config, config_path)
        peft_config.check_config(config, config_path, self.max_rank)  # a bad config costs no tensor read
        try:  # (the weights file is opened as it is, and only looked at when that fails: one stat less a load)
            weights = self._open(weights_path)
        except InvalidArgument:
            _refuse_folder(folder, config_mode)  # what is wrong with the folder, where that is what failed
            raise
        with weights:
            # (The config as written: equal bytes, equal config. One written otherwise is judged once more.)
            key: LayoutKey = ("peft", weights.tensor_section, weights.data_bytes, config_bytes, self.expert)
            scaled = self._module_config(config)  # (None: no module verdicts are kept for this config)
            fitted = self._remembered(key, str(folder))
            if fitted is None and scaled is not None:
                fitted = self._of_known_modules(key, folder, weights, config, scaled)
            if fitted is None:
                infos = weights.header.tensors
                self._check_ranks_and_dtypes(infos, weights_path, None)
                sources = file_layouts.peft_sources(infos, weights_path, self.naming.denoiser)
                sources = _configured(sources, infos, config, config_path)
                layout = AdapterLayout(
                    str(folder), AdapterFormat.PEFT, weights_path, tuple(sources), infos, weights.data_bytes
                )
                targets = _display_targets(config, sources)
                fitted = self._fitted(key, layout, _display_alpha(config), targets, remember=scaled)
            adapter = self._load(weights, fitted, str(folder))
        if current_stamp(config_path) != config_stamp:  # half an old config with new weights is no adapter
            raise InvalidArgument(f"{config_path} changed while the adapter was being read; retry once it is written")
        adapter.files = ((str(config_path), config_stamp), *adapter.files)
        return adapter

    def _read_file(self, file: Path, path: str) -> AdapterWeights:
        with self._open(file) as weights:
            # (diffusers' files hold their LoraConfig in the metadata: it decides the verdict with the tensors.)
            config_text = weights.header.metadata.get(DIFFUSERS_METADATA_KEY, "")
            key: LayoutKey = ("file", weights.tensor_section, weights.data_bytes, config_text, self.expert)
            fitted = self._remembered(key, path)
            if fitted is None:
                fitted = self._fitted(key, *self._file_layout(weights, file, path))
            return self._load(weights, fitted, path)

    def _file_layout(
        self, weights: SafetensorsFile, file: Path, path: str
    ) -> tuple[AdapterLayout, float | None, list[str]]:
        infos = weights.header.tensors
        fmt = file_layouts.kind_of(infos, in_peft_folder=False)
        if fmt is None:
            raise file_layouts.unknown_layout(file, infos)
        if fmt is AdapterFormat.DIFFUSERS:
            sources, alpha, targets = self._diffusers_layout(weights, file)
        elif fmt is AdapterFormat.DIFFUSERS_OLD:
            sources = file_layouts.old_diffusers_sources(infos, file, self.naming)
            alpha, targets = None, _display_targets({}, sources)
        else:
            sources = file_layouts.kohya_sources(infos, file, self.naming)
            alpha, targets = None, _display_targets({}, sources)
        if fmt is not AdapterFormat.DIFFUSERS:  # (a diffusers file's were checked before its config)
            self._check_ranks_and_dtypes(infos, file, sources)
        return AdapterLayout(path, fmt, file, tuple(sources), infos, weights.data_bytes), alpha, targets

    def _open(self, file: Path) -> SafetensorsFile:
        headers = self.memo.headers if self.memo is not None else None
        return open_safetensors(file, self.may_open, self.max_tensors, headers)

    def _remembered(self, key: LayoutKey, path: str) -> FittedLayout | None:
        """The model's verdict on a layout it judged before (for another file, maybe: its layout's path and file
        are the first one's), room reserved for the adapter at `path`."""
        fitted = self.memo.fitted.get(key) if self.memo is not None else None
        if fitted is not None:
            self._reserve(fitted, path)
        return fitted

    def _module_config(self, config: dict[str, Any]) -> ScalingKey | None:
        """What of a PEFT config decides its modules' verdicts, where they are kept (see LayoutMemo.modules): a
        model to judge against, a memo, no rank or alpha patterns."""
        if self.memo is None or self.fit is None or config.get("rank_pattern") or config.get("alpha_pattern"):
            return None
        return config["r"], config.get("lora_alpha", config["r"]), bool(config.get("use_rslora"))

    def _of_known_modules(
        self, key: LayoutKey, folder: Path, weights: SafetensorsFile, config: dict[str, Any], scaled: ScalingKey
    ) -> FittedLayout | None:
        """A PEFT layout not seen before whose every module the model judged before, in other layouts of the same
        r, lora_alpha, use_rslora and expert (see LayoutMemo.modules): its verdict put together from theirs, as
        judging it whole would give it. None when any module is new (or the layout anything but pairs): then it
        is judged whole."""
        memo, infos = self.memo, weights.header.tensors
        if memo is None:
            return None
        names = sorted(infos)
        modules = file_layouts.paired_modules(names, file_layouts.PEFT_KEY_PREFIX)
        if modules is None:
            return None
        tensor = infos.__getitem__
        keys = [
            (module, down.dtype, down.shape, up.dtype, up.shape, scaled, self.expert)
            for module, down, up in zip(modules, map(tensor, names[0::2]), map(tensor, names[1::2]), strict=True)
        ]
        known = memo.modules.get_all(keys)
        if None in known:
            return None
        judged: list[JudgedModule] = known  # type: ignore[assignment]  # (none is None)
        sources, fit_list, rank_list, nbytes, own = zip(*judged, strict=True)
        layout = AdapterLayout(str(folder), AdapterFormat.PEFT, weights.file, sources, infos, weights.data_bytes)
        fits = dict(zip(modules, fit_list, strict=True))  # (a PEFT source is named by its module)
        alpha, targets = _display_alpha(config), _display_targets(config, list(sources))
        return self._put_together(key, layout, fits, rank_list, sum(nbytes), alpha, targets, list(own))

    def _remember_modules(
        self, fitted: FittedLayout, scaled: ScalingKey, fit_bytes: dict[str, int], own: list[OwnPair | None]
    ) -> None:
        """Each module's verdict in a PEFT layout judged whole, for `_of_known_modules`."""
        if self.memo is None:
            return
        infos, items = fitted.layout.infos, list[tuple[ModuleVerdictKey, JudgedModule]]()
        for source, rank, pair in zip(fitted.layout.sources, fitted.ranks, own, strict=True):
            down, up = infos[source.keys[DOWN]], infos[source.keys[UP]]
            key = (source.name, down.dtype, down.shape, up.dtype, up.shape, scaled, self.expert)
            items.append((key, (source, fitted.fits[source.name], rank, fit_bytes[source.name], pair)))
        self.memo.modules.put_all(items)

    def _fitted(
        self,
        key: LayoutKey,
        layout: AdapterLayout,
        alpha: float | None,
        targets: list[str],
        remember: ScalingKey | None = None,
    ) -> FittedLayout:
        """The layout as it goes into the model (into its expert), and the model's verdict: each module's delta
        shape (or the refusal), before a byte of tensor data is read; room reserved for what the read makes.
        `remember`: a PEFT layout's config, under which each module's verdict is kept too."""
        if self.expert is not None and self.expert != self.naming.denoiser:
            sources = file_layouts.into_expert(layout.sources, self.naming.denoiser, self.expert, layout.file)
            layout = replace(layout, sources=sources)
        fits = self.fit.check(layout) if self.fit is not None else _shapes_without_model(layout)
        ranks = tuple([_declared_rank(s, layout.infos) for s in layout.sources])
        fit_bytes = {name: _pair_bytes(fit) for name, fit in fits.items()}
        pair_bytes = sum(fit_bytes.values())
        pair_bytes += sum(adapter_math.kron_bytes(layout.shapes(s)) for s in layout.sources if s.algorithm == "lokr")
        own = [_own_pair(s, fits[s.name], layout.infos) for s in layout.sources]
        fitted = self._put_together(key, layout, fits, ranks, pair_bytes, alpha, targets, own)
        if remember is not None:
            self._remember_modules(fitted, remember, fit_bytes, own)
        return fitted

    def _put_together(
        self,
        key: LayoutKey,
        layout: AdapterLayout,
        fits: dict[str, ModuleFit],
        ranks: tuple[int, ...],
        pair_bytes: int,
        alpha: float | None,
        targets: list[str],
        own: list[OwnPair | None],
    ) -> FittedLayout:
        """The verdict on a layout from its modules' (`pair_bytes`: what making their exact pairs allocates; `own`:
        how a load takes each from the file, if it can), remembered; room reserved for what the read makes."""
        pairs = _own_pairs(own, len(layout.infos)) if alpha is not None else None
        fitted = FittedLayout(layout, fits, ranks, layout.nbytes + pair_bytes, alpha, tuple(targets), pairs)
        if self.memo is not None and len(key[1]) + len(key[3]) <= MEMO_HEADER_BYTES:  # its memory stays bounded
            self.memo.fitted.put(key, fitted)
        self._reserve(fitted, layout.path)
        return fitted

    def _reserve(self, fitted: FittedLayout, path: str) -> None:
        if self.fit is not None:
            self.fit.reserve(fitted.nbytes, f"adapter {path!r}")

    def _diffusers_layout(self, weights: SafetensorsFile, file: Path) -> tuple[list[ModuleSource], float, list[str]]:
        """`save_lora_weights` files: each component's keys under its name, its LoraConfig in the metadata."""
        header = weights.header
        self._check_ranks_and_dtypes(header.tensors, file, None)  # before a config inferred from them
        by_component: dict[str, dict[str, TensorInfo]] = {}
        for key, info in header.tensors.items():
            by_component.setdefault(key.split(".", 1)[0], {})[key] = info
        foreign = sorted(set(by_component) - set(self.naming.components))
        if foreign:
            raise FailedPrecondition(
                f"{file}: keys under {shown(foreign[0] + '.')} adapt a part this model does not have; it has "
                f"{', '.join(sorted(self.naming.components))}"
            )
        packed: dict[str, Any] = {}
        raw = header.metadata.get(DIFFUSERS_METADATA_KEY)
        if raw:
            parsed = parse_json(raw, f"{file}: metadata '{DIFFUSERS_METADATA_KEY}'")
            if not isinstance(parsed, dict):
                raise InvalidArgument(f"{file}: metadata '{DIFFUSERS_METADATA_KEY}' is not a JSON object")
            packed = parsed
        sources: list[ModuleSource] = []
        alphas: list[float] = []
        targets: set[str] = set()
        for component in sorted(by_component):
            infos = by_component[component]
            prefix = component + "."
            found = file_layouts.peft_sources(infos, file, component, prefix=prefix)
            config = {k.removeprefix(prefix): v for k, v in packed.items() if k.startswith(prefix)}
            if "r" not in config:
                # Without a stored config diffusers assumes alpha == r; so do we, consistently.
                rank = max(infos[s.keys[DOWN]].shape[0] for s in found)
                config = {"r": rank, "lora_alpha": rank, **config}
            peft_config.check_config(config, file, self.max_rank)
            # Named as the file names them, component first: two text encoders have modules of one name.
            sources += [s._replace(name=prefix + s.name) for s in _configured(found, infos, config, file)]
            alphas.append(_display_alpha(config))
            targets.update(_display_targets(config, found))
        return sources, alphas[0], sorted(targets)

    def _check_ranks_and_dtypes(
        self, infos: Mapping[str, TensorInfo], file: Path, sources: list[ModuleSource] | None
    ) -> None:
        """Ranks over the cap and tensors of no float type are refused from the header."""
        alpha_keys = {s.alpha_key for s in sources or () if s.alpha_key is not None}
        for key in alpha_keys:
            if math.prod(infos[key].shape) != 1:
                shape = list(infos[key].shape)
                raise InvalidArgument(f"{file}: {shown(key)} has shape {shape}; an alpha is one number")
        all_floats = {info.dtype for info in infos.values()}.issubset(FLOAT_DTYPES)  # (one pass in C, mostly)
        for key, info in () if all_floats else infos.items():
            if key not in alpha_keys and info.dtype not in FLOAT_DTYPES:
                raise InvalidArgument(
                    f"{file}: tensor {shown(key)} has dtype {info.dtype}; weights must be {', '.join(FLOAT_DTYPES)} "
                    "(only a module's alpha may be an integer)"
                )
        if self.max_rank is None:
            return
        if sources is None:  # PEFT keys: the rank is the first dimension of lora_A
            for key, info in infos.items():
                if key.endswith(".lora_A.weight") and info.shape and info.shape[0] > self.max_rank:
                    self._over_cap(file, key, info.shape[0])
            return
        for source in sources:  # every inner rank: a LoHa's two, a LoKr's factorised factors
            shapes = {role: infos[key].shape for role, key in source.keys.items()}
            for role, rank in adapter_math.inner_ranks(shapes).items():
                if rank > self.max_rank:
                    self._over_cap(file, source.keys[role], rank)

    def _over_cap(self, file: Path, key: str, rank: int) -> None:
        raise InvalidArgument(
            f"{file}: tensor {shown(key)} has rank {rank}, above this server's limit of {self.max_rank} "
            f"(set with {MAX_RANK_FLAG})"
        )

    # ---- reading ------------------------------------------------------------------------------------

    def _load(self, weights: SafetensorsFile, fitted: FittedLayout, path: str) -> AdapterWeights:
        """Read the tensors of the adapter at `path` (a layout the model accepted), and make each module's exact
        pair. The layout may have been judged for another file, and name that one: messages name `weights.file`."""
        layout, file = fitted.layout, weights.file
        tensors = weights.read()
        whole = weights.values_read()
        bound = self.fit.max_abs_weight if self.fit is not None else _FLOAT32_SAFE
        plan = fitted.own
        if (
            plan is not None
            and whole is not None
            and whole.dtype is torch.float32
            and _within(whole, plan.factor, bound)
        ):
            taken = zip(map(tensors.__getitem__, plan.downs), map(tensors.__getitem__, plan.ups), strict=True)
            return AdapterWeights(
                path=path,
                format=layout.format,
                modules=dict(zip(plan.modules, taken, strict=True)),
                scalings=dict(zip(plan.modules, plan.scalings, strict=True)),
                alpha=fitted.alpha if fitted.alpha is not None else 1.0,  # (never None where `own` is set)
                rank=max(fitted.ranks),
                target_modules=list(fitted.targets),
                files=((str(file), weights.stamp),),
            )
        # Any other layout, or a peak beyond the bound: module by module (which names the tensor to blame).
        modules: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]] = {}
        scalings: dict[ModuleKey, float] = {}
        alphas: list[float] = []
        # (label, tensor, scaling), checked at the end; `own` are the file's own tensors, bounded by the file.
        pairs: list[tuple[Label, torch.Tensor, float]] = []
        own: list[tuple[Label, torch.Tensor, float]] = []
        kron: dict[ModuleKey, adapter_math.Kron] = {}
        # Pairs the file holds as they are (float32, the exact shapes) are bounded by the file's own peak.
        float32_file = whole is not None and whole.dtype == torch.float32
        for source, rank in zip(layout.sources, fitted.ranks, strict=True):
            keys, fit = source.keys, fitted.fits[source.name]
            scaling, module_alpha = _source_scaling(file, source, tensors, rank)
            alphas.append(module_alpha)
            if len(keys) == 2 and DOWN in keys and UP in keys:  # the pair is the file's own two tensors
                down, up = tensors[keys[DOWN]], tensors[keys[UP]]
                if down.dtype is torch.float32 is up.dtype and down.shape == fit.a and up.shape == fit.b:
                    a, b = down, up  # already the exact pair: nothing to make
                    checks = own if float32_file else pairs
                else:
                    a, b = adapter_math.exact_pair(source.algorithm, {DOWN: down, UP: up}, fit.weight)
                    same = whole is not None and down.dtype == up.dtype == whole.dtype and a.shape[0] == down.shape[0]
                    checks = own if same else pairs  # (same: the values converted and reshaped)
                checks.append((("tensor ", keys[DOWN], ""), a, 1.0))
                checks.append((("tensor ", keys[UP], ""), b, scaling))
            else:  # made from its tensors: check them first, so that a NaN is blamed on its own key
                parts = {role: tensors[key] for role, key in keys.items()}
                for role, tensor in parts.items():
                    _check_magnitude(file, ("tensor ", keys[role], ""), tensor, 1.0, math.inf)
                a, b = adapter_math.exact_pair(source.algorithm, parts, fit.weight)
                (target, *others) = source.targets
                # (A fused target's rows come from the pair's B: the factors serve a whole layer only.)
                if source.algorithm == "lokr" and not others and target.rows is None and not target.swap:
                    factors = adapter_math.kron_factors(parts, fit.weight)
                    if factors is not None:
                        kron[(target.component, target.module)] = factors
                pairs += [
                    (("the A of module ", source.name, "'s delta"), a, 1.0),
                    (("the B of module ", source.name, "'s delta"), b, scaling),
                ]
            for target in source.targets:
                key = (target.component, target.module)
                if key in modules:
                    raise InvalidArgument(
                        f"{file}: module {shown(source.name)} adapts {target.component} {shown(target.module)}, "
                        "which another module of the file adapts already"
                    )
                modules[key] = (a, b if target.rows is None and not target.swap else _target_rows(b, target))
                scalings[key] = scaling
        _check_magnitudes(file, own, bound, whole)
        _check_magnitudes(file, pairs, bound)
        del tensors  # the pairs keep what they need
        return AdapterWeights(
            path=path,
            format=layout.format,
            modules=modules,
            scalings=scalings,
            alpha=fitted.alpha if fitted.alpha is not None else Counter(alphas).most_common(1)[0][0],
            rank=max(fitted.ranks),
            target_modules=list(fitted.targets),
            files=((str(file), weights.stamp),),
            kron=kron,
        )


def _mode(path: Path) -> int | None:
    """The file type and mode bits of what `path` names (symlinks followed), or None where nothing is: one stat
    for what pathlib's exists, is_dir and is_file would ask one each (other OS errors are the caller's)."""
    try:
        return os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno in (errno.EBADF, errno.ELOOP):  # as pathlib counts them: nothing there
            return None
        raise


def _is_file(mode: int | None) -> bool:
    return mode is not None and stat.S_ISREG(mode)


def _refuse_folder(folder: Path, config_mode: int | None) -> None:
    """Raise what is wrong with a PEFT folder (its config's mode given) whose files are not both regular files:
    weights only pickled, a file that is no regular file, a file missing. Returns if nothing is (the caller's
    error stands)."""
    config_path, weights_path = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    weights_mode = _mode(weights_path)
    if not _is_file(weights_mode):
        pickled = [name for name in ("adapter_model.bin", "adapter_model.pt") if (folder / name).exists()]
        if pickled:
            raise InvalidArgument(
                f"adapter folder {shown(str(folder))} has {pickled[0]} but no {PEFT_WEIGHTS}: pickled weights are "
                "refused because unpickling can run arbitrary code; save the adapter with safe_serialization=True",
                field="path",
            )
    modes = ((config_path, config_mode), (weights_path, weights_mode))
    for p, mode in modes:
        if mode is not None and not _is_file(mode):
            raise InvalidArgument(f"{p} is not a regular file (a directory or a device?)", field="path")
    missing = [p.name for p, mode in modes if mode is None]
    if missing:
        raise InvalidArgument(
            f"adapter folder {shown(str(folder))} is missing {' and '.join(missing)}; a PEFT adapter folder holds "
            f"{PEFT_CONFIG} and {PEFT_WEIGHTS}",
            field="path",
        )


# sqrt of float32's largest value: the default bound on |weight| x scaling when no model says otherwise.
_FLOAT32_SAFE = math.sqrt(float(torch.finfo(torch.float32).max))


def _lora_config(config: Any, config_path: Path) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise InvalidArgument(f"{config_path} must hold a JSON object, not {type(config).__name__}")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise InvalidArgument(f"{config_path}: peft_type {shown(peft_type)} is not supported, only LORA")
    return config


def _configured(
    sources: list[ModuleSource], infos: Mapping[str, TensorInfo], config: dict[str, Any], source_file: Path
) -> list[ModuleSource]:
    """PEFT sources with the scaling peft's rules give each module (patterns included)."""
    # A file can hold thousands of modules: without patterns every module's scaling is the first one's (each
    # rank still checked against r), and the sources are made directly, not by dataclasses.replace.
    uniform = not config.get("rank_pattern") and not config.get("alpha_pattern")
    first: float | None = None
    configured = []
    for s in sources:
        rank = _first_dim(infos[s.keys[DOWN]])
        if first is None or not uniform or rank != config["r"]:
            scaling = peft_config.module_scaling(config, s.name, rank, source_file)
            first = scaling if first is None else first
        else:
            scaling = first
        configured.append(ModuleSource(s.name, s.algorithm, s.keys, scaling, s.alpha_key, s.targets))
    return configured


def _own_pair(source: ModuleSource, fit: ModuleFit, infos: Mapping[str, TensorInfo]) -> OwnPair | None:
    """How a load takes this module's exact pair from the file, when the pair is its own two float32 tensors as
    they are, for one whole target, scaled by a config (None for any other module)."""
    keys, targets = source.keys, source.targets
    if source.algorithm != "lora" or source.scaling is None or len(keys) != 2 or len(targets) != 1:
        return None
    down, up, target = keys.get(DOWN), keys.get(UP), targets[0]
    if down is None or up is None or target.rows is not None or target.swap:
        return None
    a, b = infos[down], infos[up]
    if a.dtype != "F32" or b.dtype != "F32" or a.shape != fit.a or b.shape != fit.b:
        return None
    return down, up, (target.component, target.module), source.scaling


def _own_pairs(own: list[OwnPair | None], tensors: int) -> OwnPairs | None:
    """The layout's modules in columns, when every one is an OwnPair, their tensors are all the file holds (so
    its data region is float32 throughout, and its peak bounds them all) and no two go into the same module."""
    if not own or None in own or 2 * len(own) != tensors:
        return None
    downs, ups, modules, scalings = zip(*own, strict=True)
    if len(set(modules)) != len(modules) or len({*downs, *ups}) != tensors:
        return None  # (the general path names a module adapted twice)
    return OwnPairs(downs, ups, modules, scalings, max(1.0, *map(abs, scalings)))


def _pair_bytes(fit: ModuleFit) -> int:
    """What a module's exact pair takes in float32."""
    return 4 * (math.prod(fit.a) + math.prod(fit.b))


def _declared_rank(source: ModuleSource, infos: Mapping[str, TensorInfo]) -> int:
    """The rank a file declares for a module, from its header: what its alpha is divided by (0: a LoKr of two
    full factors applies no alpha)."""
    role = adapter_math.rank_role(source.algorithm, source.keys)
    return _first_dim(infos[source.keys[role]]) if role is not None else 0


def _first_dim(info: TensorInfo) -> int:
    return info.shape[0] if info.shape else 0


def _display_alpha(config: dict[str, Any]) -> float:
    return float(config.get("lora_alpha", config["r"]))


def _display_targets(config: dict[str, Any], sources: list[ModuleSource]) -> list[str]:
    """target_modules as the adapter's own config names them, or the module kinds it adapts."""
    declared = config.get("target_modules")
    if isinstance(declared, str):
        return [declared]
    if isinstance(declared, list):
        return sorted(declared)
    return sorted({target.module.rsplit(".", 1)[-1] for s in sources for target in s.targets})


def _shapes_without_model(layout: AdapterLayout) -> dict[str, ModuleFit]:
    """With no model to ask, a LoRA pair's own shapes say the layer's: (out, in[, kh, kw])."""
    fits: dict[str, ModuleFit] = {}
    for source in layout.sources:
        s = layout.shapes(source)
        down, up = s.get("lora_down.weight"), s.get("lora_up.weight")
        if source.algorithm != "lora" or down is None or up is None or "lora_mid.weight" in s:
            raise FailedPrecondition(f"{layout.file}: module {shown(source.name)} can only be read against a model")
        if len(down) not in (2, 4) or len(up) != len(down) or not up or up[1:2] != down[:1]:
            raise InvalidArgument(
                f"{layout.file}: module {shown(source.name)} has lora_A {list(down)} and lora_B {list(up)}, which do "
                "not form a low-rank pair"
            )
        weight = (up[0], *down[1:])
        try:
            fits[source.name] = ModuleFit(weight, *adapter_math.pair_shapes("lora", s, weight))
        except adapter_math.NotAPair as exc:
            raise InvalidArgument(f"{layout.file}: module {shown(source.name)} {exc}") from None
    return fits


def _source_scaling(
    file: Path, source: ModuleSource, tensors: Mapping[str, torch.Tensor], rank: int
) -> tuple[float, float]:
    """A module's scaling and alpha: its config's (PEFT, diffusers), else its own alpha / declared rank (Kohya,
    LyCORIS: no alpha, or a LoKr of two full factors, is scale 1)."""
    if source.scaling is not None:
        return source.scaling, source.scaling * rank
    if source.alpha_key is None or rank == 0:
        return 1.0, float(rank)
    value = tensors[source.alpha_key]
    if value.numel() != 1:
        raise InvalidArgument(f"{file}: {shown(source.alpha_key)} holds {value.numel()} values; an alpha is one number")
    alpha = float(value.reshape(()).item())
    if not math.isfinite(alpha):
        raise InvalidArgument(f"{file}: {shown(source.alpha_key)} is {alpha}, not a finite number")
    scaling = alpha / rank
    if not abs(scaling) <= MAX_SCALING:
        raise InvalidArgument(
            f"{file}: {shown(source.alpha_key)} = {alpha:g} gives module {shown(source.name)} the scaling alpha/r = "
            f"{scaling:g}; a scaling beyond +-{MAX_SCALING:g} is refused (it only yields overflow)"
        )
    return scaling, alpha


def _target_rows(b: torch.Tensor, target: Target) -> torch.Tensor:
    """The rows of a delta's B that one target takes (a fused qkv feeds three layers), halves exchanged if asked."""
    if target.rows is not None:
        b = b[target.rows[0] : target.rows[1]]
    if target.swap:
        half = b.shape[0] // 2
        b = torch.cat([b[half:], b[:half]])
    return b


def _check_magnitudes(
    file: Path, checks: list[tuple[Label, torch.Tensor, float]], bound: float, whole: torch.Tensor | None = None
) -> None:
    """`_check_magnitude` for each (name, tensor, scaling), in order. One reduction over all of them first (over
    `whole` when given: values that include every checked one, e.g. the file's data region): a small adapter has
    hundreds of tensors, and one pass costs less than one call per tensor; only when that finds something does
    each get its own check, for a message naming the tensor."""
    if not checks:
        return
    if whole is None:
        floats = [tensor.reshape(-1) for _, tensor, _ in checks if tensor.numel() and tensor.is_floating_point()]
        if not floats:
            return
        whole = torch.cat(floats)
    if _within(whole, max(1.0, *map(abs, map(itemgetter(2), checks))), bound):
        return
    for name, tensor, scaling in checks:
        _check_magnitude(file, name, tensor, scaling, bound)


def _within(values: torch.Tensor, factor: float, bound: float) -> bool:
    """No NaN or Inf among the values, and none beyond `bound` once multiplied by `factor`."""
    if _surely_within(values, factor, bound):
        return True
    peak = _peak(values) if values.numel() else 0.0
    return math.isfinite(peak) and peak * factor <= bound


# float32 sums a dot product's n squares to within n x 2^-24 of their true sum, relative (the terms are >= 0):
# up to this many values, at worst a quarter too small.
_SQUARES_MAX = 1 << 22


def _surely_within(values: torch.Tensor, factor: float, bound: float) -> bool:
    """A sufficient test of `_within` in one pass over host float32 values (the peak takes two): the largest
    |value| is at most the root of the sum of squares, which one BLAS dot computes. A NaN, an Inf or an overflow
    fails it, as do sums near the bound (with a margin for the dot's rounding): `_within` then takes the peak."""
    if values.dtype is not torch.float32 or not values.is_cpu or not 0 < values.numel() <= _SQUARES_MAX:
        return False
    flat = (values if values.dim() == 1 else values.reshape(-1)).numpy()
    with numpy.errstate(over="ignore", invalid="ignore"):  # (an overflow is an Inf: it fails below)
        squares = float(flat.dot(flat))
    # max^2 <= true sum <= squares / (1 - 1/4); half of bound^2 leaves room for that and any rounding here.
    return squares * factor * factor <= bound * bound / 2


def _peak(tensor: torch.Tensor) -> float:
    """The largest |value| (NaN if the tensor holds a NaN or an Inf), allocating nothing of the tensor's size (NaN
    propagates). Host tensors numpy holds are reduced by numpy, on the calling thread: an adapter is a few MiB,
    and torch's reduction of that size wakes its other threads, which costs more than the reduction (twice the
    time, measured here in a loading server); others by aminmax (ten times faster than an inf-norm)."""
    if tensor.device.type == "cpu" and tensor.dtype in _NUMPY_FLOATS:
        values = tensor.numpy()
        low, high = float(values.min()), float(values.max())
    else:
        low, high = (float(v) for v in torch.aminmax(tensor))
    return max(-low, high) if math.isfinite(low) and math.isfinite(high) else math.nan


_NUMPY_FLOATS = (torch.float32, torch.float16, torch.float64)


def _check_magnitude(file: Path, label: Label, tensor: torch.Tensor, scaling: float, bound: float) -> None:
    """No NaN or Inf, and no weight so large that (with its scaling) only overflow can come of it."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return
    peak = _peak(tensor)
    name = f"{label[0]}{shown(label[1])}{label[2]}"
    factor = max(1.0, abs(scaling))
    if not math.isfinite(peak):
        raise InvalidArgument(f"{file}: {name} contains NaN or Inf")
    if peak * factor > bound:
        raise InvalidArgument(
            f"{file}: {name} holds values up to {peak:.3g} (x scaling {factor:g}); beyond {bound:.3g} the "
            "model's dtype can only overflow"
        )
