"""The adapter table: ids, names, paths, pins, use counts and the LRU bound.

Every state change happens under one lock. The table never touches the model: reading and attaching
an adapter, and detaching it, are done by an `AdapterBackend` (the engine's, which runs them on the
worker that owns the pipeline), always outside the lock so slow loads never block lookups.

A request holds its adapter (`in_use`) from admission to its last denoising step: eviction skips held
adapters, and unloading a held adapter removes it from the table at once but detaches it only when the
last holder releases it.

Tiers: an adapter's tensors live on the device (ready for requests) up to `max_device`, in host memory
up to `max_host`, and beyond that only on disk (the table keeps its metadata and re-reads the file when a
request needs it). The least recently used adapters move down; pinned and held ones never do. Every
move is counted per adapter (hits, loads, promotions, evictions). Keeping the tier counts up to date
makes a hit O(1), whatever the number of adapters.

Identity: an adapter is its (normalised) path and the expert it goes into (on models with several denoisers,
one file may be loaded into each: two adapters). A request that names a loaded path is served by that
adapter, whatever name or id it gives: those are labels for a first load, and a taken one is dropped for
the derived id and a default name rather than failing the request. Only LoadAdapter renames.
Versions: a re-read (from the disk tier, or LoadAdapter of a file that changed) replaces the adapter whole,
with fresh metadata; changed files make it a new version; files that no longer load take it out of the table.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from omni_grpc.engine.path_policy import RealPath, check_path_text, real_path
from omni_grpc.engine.safetensors_reader import FileStamp, current_stamp
from omni_grpc.engine.types import AdapterFormat, AdapterInfo, LoraRequest
from omni_grpc.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from omni_grpc.quoting import loggable, shown

log = logging.getLogger(__name__)

MAX_ADAPTER_ID = (1 << 63) - 1
TOTALS = ("loads", "hits", "promotions", "evictions")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def normalize_path(path: str) -> str:
    """The canonical form of an adapter path: absolute, symlinks resolved, no trailing slash (a RealPath is)."""
    return path if type(path) is RealPath else real_path(os.path.expanduser(path))


def derive_adapter_id(path: str, expert: str = "") -> int:
    """The stable id of an adapter: 63 bits of sha256 over its normalised path (and its expert, when not the
    first), never 0.

    The one place ids are derived; `./a`, `a/` and `/abs/a` give the same id.
    """
    return _id_of(normalize_path(path), expert)


def _id_of(normalized: str, expert: str) -> int:
    """derive_adapter_id of a path already normalised (a table key's)."""
    digest = hashlib.sha256((normalized + (f"\0{expert}" if expert else "")).encode("utf-8")).digest()
    return (int.from_bytes(digest[:8], "big") & MAX_ADAPTER_ID) or 1


def check_name(name: str) -> None:
    """An adapter name: 1-128 characters from [A-Za-z0-9._-]."""
    if not NAME_PATTERN.match(name):
        raise InvalidArgument(
            f"adapter name {shown(name)} is invalid: use 1-128 characters from [A-Za-z0-9._-]", field="name"
        )


def parse_lora_spec(spec: str) -> tuple[str | None, str]:
    """`--lora-path` values: "NAME=PATH" or "PATH" (a path may itself contain '=')."""
    name, sep, path = spec.partition("=")
    if sep and NAME_PATTERN.match(name) and path:
        return name, path
    return None, spec


class Tier(enum.Enum):
    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


@dataclass(frozen=True)
class LoadedAdapter:
    """What the backend reports about an adapter it read and attached."""

    format: AdapterFormat
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    num_layers: int
    # The parts of the model it adapts ("denoiser", "text_encoder", ...).
    components: list[str] = field(default_factory=lambda: ["denoiser"])
    # Each file read, with the version of it that was read.
    files: tuple[tuple[str, FileStamp], ...] = ()

    def changed_on_disk(self) -> bool:
        """Whether a file it was read from has been replaced or changed since (a stat per file)."""
        return any(current_stamp(Path(path)) != stamp for path, stamp in self.files)


# An adapter's identity: its normalised path and its expert ("": the model's first denoiser).
AdapterKey = tuple[str, str]


class AdapterBackend(Protocol):
    def load(self, path: str, internal_name: str, expert: str = "") -> LoadedAdapter:
        """Read, validate and attach the adapter on the device (its denoiser modules into `expert`, "" for the
        first); raise an OmniError on failure."""

    def unload(self, internal_name: str) -> None:
        """Detach the adapter and free its memory (requests still running with it keep it until they end)."""

    def move(self, internal_name: str, tier: Tier) -> None:
        """Move an attached adapter's tensors to the device or to host memory."""


@dataclass
class AdapterEntry:
    id: int
    name: str
    path: str
    # Unique per load, so a re-load after an unload never collides with a layer being retired.
    internal_name: str
    loaded: LoadedAdapter
    pinned: bool
    load_time_ms: float
    # Loaded by a request naming its path (not by the operator or LoadAdapter).
    by_request: bool = False
    use_count: int = 0
    in_use: int = 0
    loads: int = 1
    retired: bool = False
    tier: Tier = Tier.DEVICE
    hits: int = 0
    promotions: int = 0
    evictions: int = 0
    # 1 at the first load; one more each time a re-read found its files changed.
    version: int = 1
    # The denoiser it goes into; "": the model's first.
    expert: str = ""
    # Held while the entry's tensors move between tiers; taken before the table lock, never after.
    move_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def info(self) -> AdapterInfo:
        return AdapterInfo(
            id=self.id,
            name=self.name,
            path=self.path,
            format=self.loaded.format,
            rank=self.loaded.rank,
            alpha=self.loaded.alpha,
            target_modules=list(self.loaded.target_modules),
            pinned=self.pinned,
            size_bytes=self.loaded.size_bytes,
            load_time_ms=self.load_time_ms,
            use_count=self.use_count,
            in_use=self.in_use,
            loads=self.loads,
            num_layers=self.loaded.num_layers,
            tier=self.tier.value,
            hits=self.hits,
            promotions=self.promotions,
            evictions=self.evictions,
            components=list(self.loaded.components),
            version=self.version,
            expert=self.expert,
        )

    @property
    def key(self) -> AdapterKey:
        return (self.path, self.expert)


@dataclass
class _Pending:
    id: int
    name: str
    explicit_name: bool
    done: Future[AdapterEntry] = field(default_factory=Future)


class AdapterLease:
    """One request's hold on an adapter; release exactly once."""

    def __init__(self, table: AdapterTable, entry: AdapterEntry, scale: float) -> None:
        self.entry = entry
        self.scale = scale
        self._table = table
        self._released = False

    @property
    def label(self) -> str:
        """How logs and errors name it: name#id@scale."""
        return f"{self.entry.name}#{self.entry.id}@{self.scale:g}"

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._table._release(self.entry)  # noqa: SLF001 - the lease is the table's own handle


class AdapterTable:
    def __init__(
        self,
        backend: AdapterBackend,
        max_loaded: int = 0,
        max_device: int = 0,
        max_host: int = 0,
        *,
        reserve_admin_adapters: bool = False,
    ) -> None:
        self._backend = backend
        # With an admin token: adapters loaded by the operator or LoadAdapter are never evicted to make room
        # for one a request loads by path; such loads evict only each other.
        self.reserve_admin_adapters = reserve_admin_adapters
        self.max_loaded = max_loaded  # entries in the table; 0: unbounded
        self.max_device = max_device  # adapters with tensors on the device; 0: unbounded
        self.max_host = max_host  # adapters with tensors in host memory
        self._tier_counts = dict.fromkeys(Tier, 0)
        self._lock = threading.Lock()
        self._by_id: OrderedDict[int, AdapterEntry] = OrderedDict()  # LRU order: least recent first
        self._by_name: dict[str, AdapterEntry] = {}
        self._by_key: dict[AdapterKey, AdapterEntry] = {}
        self._pending: dict[AdapterKey, _Pending] = {}
        self._loads_by_key: dict[AdapterKey, int] = {}
        # Every read, hit, promotion and move down since start, whatever became of the adapters (for metrics).
        self._totals = dict.fromkeys(TOTALS, 0)
        self._counter = 0

    # ---- public operations -------------------------------------------------------------------

    def load(
        self,
        path: str,
        *,
        name: str | None = None,
        adapter_id: int | None = None,
        pin: bool = False,
        expert: str = "",
    ) -> tuple[AdapterInfo, bool]:
        """Load (or find) the adapter at `path` (into `expert`). Returns its info and whether this call read it."""
        entry, newly = self._load((path, expert), name, adapter_id, pin=pin, hold=False)
        return entry.info(), newly

    def acquire(self, lora: LoraRequest) -> AdapterLease:
        """Find or load the adapter a request names, bring it to the device, and hold it there until the
        lease is released."""
        if lora.path:
            entry, newly = self._load((lora.path, lora.expert or ""), lora.name or None, lora.id, pin=False, hold=True)
        elif not lora.name and lora.id is None:
            raise InvalidArgument("lora_request needs a path, a name or an id", field="lora_request")
        else:
            with self._lock:
                entry = self._lookup_locked(lora.id, lora.name or None)
                if lora.expert is not None and lora.expert != entry.expert:
                    raise InvalidArgument(
                        f"adapter '{entry.name}' goes into {entry.expert or 'the first expert'}, not "
                        f"{lora.expert or 'the first expert'}; give its path to load it into another expert",
                        field="expert",
                    )
                self._hold_locked(entry)
            newly = False
        lease = AdapterLease(self, entry, lora.scale)
        if not newly:
            try:
                self._bring_to_device(entry)
            except BaseException:
                lease.release()
                raise
        self._rebalance_best_effort()
        return lease

    def totals(self) -> dict[str, int]:
        """Adapter reads (first loads and re-reads), hits, promotions and evictions since start."""
        with self._lock:
            return dict(self._totals)

    def tier_counts(self) -> dict[str, int]:
        with self._lock:
            return {tier.value: count for tier, count in self._tier_counts.items()}

    def unload(
        self, *, adapter_id: int | None = None, name: str | None = None, path: str | None = None, expert: str = ""
    ) -> AdapterInfo:
        """Remove an adapter (by path: the one of that expert). Held adapters finish their requests first, then are
        detached."""
        with self._lock:
            if path:
                entry = self._by_key.get((normalize_path(path), expert))
                if entry is None:
                    into = f" into {expert}" if expert else ""
                    raise NotFound(f"no adapter is loaded from path {shown(path)}{into}", field="path")
            else:
                entry = self._lookup_locked(adapter_id, name)
            self._remove_locked(entry)
            detach_now = entry.in_use == 0
            if not detach_now:
                entry.retired = True
            info = entry.info()
        if detach_now:
            self._detach(entry)
        log.info(
            "adapter unloaded id=%d name=%s in_use=%d%s",
            entry.id,
            entry.name,
            info.in_use,
            "" if detach_now else " (detached when its last request ends)",
        )
        return info

    def list(self) -> list[AdapterInfo]:
        """All adapters, most recently used first."""
        with self._lock:
            return [entry.info() for entry in reversed(self._by_id.values())]

    # ---- internals -----------------------------------------------------------------------------

    def _load(
        self, source: AdapterKey, name: str | None, adapter_id: int | None, *, pin: bool, hold: bool
    ) -> tuple[AdapterEntry, bool]:
        """`hold`: a request's load by path. The path (with its expert) is the adapter's identity; a request's name
        and id are labels for its first load, never a reason to fail it. Only an admin load (not `hold`) renames."""
        path, expert = source
        check_path_text(path)
        if name is not None:
            check_name(name)
        if adapter_id is not None and not 1 <= adapter_id <= MAX_ADAPTER_ID:
            raise InvalidArgument(f"adapter id must be between 1 and 2^63-1, got {adapter_id}", field="id")
        key = (normalize_path(path), expert)
        while True:
            with self._lock:
                existing = self._by_key.get(key)
                if existing is None:
                    pending, owner = self._pending_for_locked(key, name, adapter_id, hold=hold)
                elif hold:
                    self._hold_locked(existing)
                    return existing, False
                else:
                    self._check_id(existing.id, adapter_id, key)
                    if name is not None and name != existing.name:
                        self._rename_locked(existing, name)
                    if pin:
                        existing.pinned = True
                    existing.by_request = False  # LoadAdapter of an adapter a request loaded: the admin's now
                    self._by_id.move_to_end(existing.id)
                    if not (existing.loaded.changed_on_disk() and existing.tier is not Tier.DISK):
                        return existing, False
            if existing is not None:  # an admin loading a changed file again gets the new version now
                self._reread(existing)
                return existing, False
            if owner:
                return self._read_and_register(key, pending, pin=pin, hold=hold), True
            entry = pending.done.result()  # re-raises the loader's error for every waiter
            with self._lock:
                if self._by_id.get(entry.id) is entry:
                    if pin:
                        entry.pinned = True
                    if hold:
                        self._hold_locked(entry)
                    elif name is not None and name != entry.name:
                        self._rename_locked(entry, name)
                    return entry, False
            # Evicted or unloaded between its load and our hold: go round again.

    def _pending_for_locked(
        self, key: AdapterKey, name: str | None, adapter_id: int | None, *, hold: bool
    ) -> tuple[_Pending, bool]:
        """The load in progress of `key` (joined) or a new one (owned: True)."""
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = self._new_pending_locked(key, name, adapter_id, labels_only=hold)
            return pending, True
        if not hold:
            self._check_id(pending.id, adapter_id, key)
            if name is not None and pending.explicit_name and name != pending.name:
                raise AlreadyExists(
                    f"adapter at {_where(key)} is being loaded under the name '{pending.name}', not {shown(name)}",
                    field="name",
                )
        return pending, False

    def _new_pending_locked(
        self, key: AdapterKey, name: str | None, adapter_id: int | None, *, labels_only: bool
    ) -> _Pending:
        """The id and name of a first load. With `labels_only` (a request), a taken id or name is dropped for
        the derived id and a default name; for an admin it is ALREADY_EXISTS."""
        derived = _id_of(*key)
        if adapter_id is not None and labels_only and not self._id_free_locked(adapter_id, key):
            adapter_id = None
        new_id = adapter_id if adapter_id is not None else derived
        self._check_id_free_locked(new_id, key)
        if name is not None and labels_only and self._name_taken_locked(name):
            name = None
        return _Pending(new_id, self._choose_name_locked(key, new_id, name), explicit_name=name is not None)

    def _rename_locked(self, entry: AdapterEntry, name: str) -> None:
        self._check_name_free_locked(name)
        log.info("adapter renamed id=%d name=%s new_name=%s", entry.id, loggable(entry.name), loggable(name))
        del self._by_name[entry.name]
        entry.name = name
        self._by_name[name] = entry

    def _read_and_register(self, key: AdapterKey, pending: _Pending, *, pin: bool, hold: bool) -> AdapterEntry:
        with self._lock:
            self._counter += 1
            internal = f"omni_{pending.id:x}_{self._counter}"
        started = time.perf_counter()
        norm, expert = key
        try:
            loaded = self._backend.load(norm, internal, expert)
        except BaseException as exc:
            with self._lock:
                del self._pending[key]
            pending.done.set_exception(exc)
            raise
        load_ms = (time.perf_counter() - started) * 1000
        # Room is made only for an adapter that loaded: a bad file must never evict a good adapter.
        try:
            with self._lock:
                victim = self._make_room_locked(by_request=hold)
                entry = self._register_locked(key, pending, internal, loaded, pin=pin, load_ms=load_ms, by_request=hold)
                if hold:
                    self._hold_locked(entry)
        except BaseException as exc:
            self._backend.unload(internal)
            with self._lock:
                self._pending.pop(key, None)
            pending.done.set_exception(exc)
            raise
        if victim is not None:
            log.info(
                "adapter evicted from the table (--max-loaded-adapters) id=%d name=%s", victim.id, loggable(victim.name)
            )
            self._detach(victim)
        pending.done.set_result(entry)
        if not hold:
            self._rebalance_best_effort()
        log.info(
            "adapter loaded id=%d name=%s path=%s%s format=%s rank=%d alpha=%g layers=%d bytes=%d pinned=%s ms=%.1f",
            entry.id,
            entry.name,  # names match NAME_PATTERN: nothing to escape
            loggable(norm),
            f" expert={expert}" if expert else "",  # one of the model's component names
            loaded.format.value,
            loaded.rank,
            loaded.alpha,
            loaded.num_layers,
            loaded.size_bytes,
            pin,
            load_ms,
        )
        return entry

    def _register_locked(
        self,
        key: AdapterKey,
        pending: _Pending,
        internal: str,
        loaded: LoadedAdapter,
        *,
        pin: bool,
        load_ms: float,
        by_request: bool,
    ) -> AdapterEntry:
        loads = self._loads_by_key.get(key, 0) + 1
        self._totals["loads"] += 1
        self._loads_by_key[key] = loads
        entry = AdapterEntry(
            id=pending.id,
            name=pending.name,
            path=key[0],
            expert=key[1],
            internal_name=internal,
            loaded=loaded,
            pinned=pin,
            load_time_ms=load_ms,
            loads=loads,
            by_request=by_request,
        )
        self._by_id[entry.id] = entry
        self._by_name[entry.name] = entry
        self._by_key[key] = entry
        self._tier_counts[Tier.DEVICE] += 1
        del self._pending[key]
        return entry

    def _release(self, entry: AdapterEntry) -> None:
        with self._lock:
            entry.in_use -= 1
            detach = entry.retired and entry.in_use == 0
        if detach:
            self._detach(entry)
        else:
            self._rebalance_best_effort()  # a freed adapter may now move down to honour the bounds

    def _detach(self, entry: AdapterEntry) -> None:
        """Free a removed entry's tensors; under its move_lock, so no tier move can bring them back."""
        with entry.move_lock:
            if entry.tier is not Tier.DISK:
                self._backend.unload(entry.internal_name)

    def _rebalance_best_effort(self) -> None:
        # Moving other adapters down is housekeeping: its failure must not fail the request at hand.
        try:
            self._rebalance()
        except Exception:
            log.exception("moving adapters down a tier failed; the bounds are exceeded until the next try")

    def _bring_to_device(self, entry: AdapterEntry) -> None:
        """Make a held entry's tensors ready on the device: a hit, a promotion or a read from disk."""
        with entry.move_lock:
            with self._lock:
                tier = entry.tier
                if tier is Tier.DEVICE:
                    entry.hits += 1
                    self._totals["hits"] += 1
                    return
            if tier is Tier.DISK:
                self._reread_locked(entry)
                return
            self._backend.move(entry.internal_name, Tier.DEVICE)
            with self._lock:
                entry.promotions += 1
                self._totals["promotions"] += 1
                self._set_tier_locked(entry, Tier.DEVICE)
            log.info("adapter promoted to the device id=%d name=%s", entry.id, loggable(entry.name))

    def _reread(self, entry: AdapterEntry) -> None:
        with entry.move_lock:
            self._reread_locked(entry)

    def _reread_locked(self, entry: AdapterEntry) -> None:
        """Read an entry's files again (from the disk tier, or changed on disk), under its move_lock: what comes
        back replaces every part of the old version at once, with fresh metadata; a file that changed is a new
        version, and one that no longer loads takes its adapter out of the table (no half of it is served)."""
        try:
            loaded = self._backend.load(entry.path, entry.internal_name, entry.expert)
        except BaseException:
            with self._lock:
                removed = self._by_id.get(entry.id) is entry
                if removed:
                    self._remove_locked(entry)
                    entry.retired = True
                detach_now = removed and entry.in_use == 0 and entry.tier is not Tier.DISK
            if detach_now:  # the old version's tensors (an admin's re-read of a changed file); held: at release
                self._backend.unload(entry.internal_name)
            if removed:
                log.warning(
                    "adapter removed: its files no longer load id=%d name=%s version=%d",
                    entry.id,
                    entry.name,
                    entry.version,
                )
            raise
        with self._lock:
            changed = loaded.files != entry.loaded.files
            if changed:
                entry.version += 1
            entry.loaded = loaded
            entry.loads = self._loads_by_key[entry.key] = self._loads_by_key.get(entry.key, 0) + 1
            self._totals["loads"] += 1
            self._set_tier_locked(entry, Tier.DEVICE)
        log.info(
            "adapter re-read from disk id=%d name=%s version=%d%s rank=%d bytes=%d",
            entry.id,
            entry.name,
            entry.version,
            " (its files changed)" if changed else "",
            loaded.rank,
            loaded.size_bytes,
        )

    def _rebalance(self) -> None:
        """Move least recently used adapters down until every tier is within its bound."""
        skipped: set[int] = set()
        while True:
            with self._lock:
                victim, target = self._pick_victim_locked(skipped)
            if victim is None:
                return
            if not victim.move_lock.acquire(blocking=False):  # someone is promoting it right now
                skipped.add(victim.id)
                continue
            try:
                with self._lock:
                    registered = self._by_id.get(victim.id) is victim
                    if not registered or victim.in_use or victim.pinned or victim.tier is target:
                        skipped.add(victim.id)
                        continue
                if target is Tier.HOST:
                    self._backend.move(victim.internal_name, Tier.HOST)
                else:
                    self._backend.unload(victim.internal_name)
                with self._lock:
                    self._set_tier_locked(victim, target)
                    victim.evictions += 1
                    self._totals["evictions"] += 1
                log.info("adapter moved down to %s id=%d name=%s", target.value, victim.id, loggable(victim.name))
            finally:
                victim.move_lock.release()

    def _pick_victim_locked(self, skipped: set[int]) -> tuple[AdapterEntry | None, Tier]:
        moves: list[tuple[Tier, Tier]] = []
        if self.max_device and self._tier_counts[Tier.DEVICE] > self.max_device:
            moves.append((Tier.DEVICE, Tier.HOST if self.max_host else Tier.DISK))
        if self._tier_counts[Tier.HOST] > self.max_host:
            moves.append((Tier.HOST, Tier.DISK))
        for source, target in moves:
            for entry in self._by_id.values():  # least recently used first
                if entry.tier is source and not entry.pinned and entry.in_use == 0 and entry.id not in skipped:
                    return entry, target
        # Everything over a bound is pinned or held by a request: the bound is exceeded until they free up.
        return None, Tier.DISK

    def _set_tier_locked(self, entry: AdapterEntry, tier: Tier) -> None:
        # Removed entries (unloaded while held, or evicted mid-move) no longer count in any tier.
        if self._by_id.get(entry.id) is entry:
            self._tier_counts[entry.tier] -= 1
            self._tier_counts[tier] += 1
        entry.tier = tier

    def _hold_locked(self, entry: AdapterEntry) -> None:
        entry.in_use += 1
        entry.use_count += 1
        self._by_id.move_to_end(entry.id)

    def _lookup_locked(self, adapter_id: int | None, name: str | None) -> AdapterEntry:
        if name:
            check_name(name)
        by_id = self._by_id.get(adapter_id) if adapter_id is not None else None
        by_name = self._by_name.get(name) if name else None
        if adapter_id is not None and by_id is None:
            raise NotFound(f"no adapter with id {adapter_id} is loaded; give its path to load it", field="id")
        if name and by_name is None:
            raise NotFound(f"no adapter named {shown(name)} is loaded; give its path to load it", field="name")
        if by_id is not None and by_name is not None and by_id is not by_name:
            raise InvalidArgument(
                f"id {adapter_id} and name {shown(name)} name two different adapters "
                f"('{by_id.name}' and id {by_name.id})",
                field="id",
            )
        entry = by_id or by_name
        if entry is None:
            raise InvalidArgument("give the id or the name of the adapter")
        return entry

    def _check_id(self, bound_id: int, adapter_id: int | None, key: AdapterKey) -> None:
        if adapter_id is not None and adapter_id != bound_id:
            raise AlreadyExists(
                f"adapter at {_where(key)} is already loaded with id {bound_id}, not {adapter_id}; an id never "
                "changes (the name may: LoadAdapter with a new name renames it)",
                field="id",
            )

    def _id_free_locked(self, adapter_id: int, key: AdapterKey) -> bool:
        holder = self._by_id.get(adapter_id)
        other = holder.key if holder else next((k for k, w in self._pending.items() if w.id == adapter_id), None)
        return other is None or other == key

    def _check_id_free_locked(self, adapter_id: int, key: AdapterKey) -> None:
        if not self._id_free_locked(adapter_id, key):
            # Named by its name, never its path: a client must not learn where another adapter lives.
            holder = self._by_id.get(adapter_id)
            whose = f"the adapter '{holder.name}'" if holder else "an adapter being loaded"
            raise AlreadyExists(f"adapter id {adapter_id} is already bound to {whose}", field="id")

    def _name_taken_locked(self, name: str) -> bool:
        # (Asked at every first load: no copy of the table's names.)
        return name in self._by_name or any(p.name == name for p in self._pending.values())

    def _check_name_free_locked(self, name: str) -> None:
        if self._name_taken_locked(name):
            holder = self._by_name.get(name)
            whose = f"the adapter with id {holder.id}" if holder else "an adapter being loaded"
            raise AlreadyExists(f"adapter name {shown(name)} is already bound to {whose}", field="name")

    def _choose_name_locked(self, key: AdapterKey, adapter_id: int, name: str | None) -> str:
        if name is not None:
            self._check_name_free_locked(name)
            return name
        norm, expert = key
        base = os.path.basename(norm)
        base = base.removesuffix(".safetensors")  # (a file's suffix; a folder so named is named alike)
        base = f"{base}.{expert}" if expert else base
        candidate = base if NAME_PATTERN.match(base) else f"lora-{adapter_id:x}"
        # A default name never fails a load: two folders both called "lora" get distinct names.
        return candidate if not self._name_taken_locked(candidate) else f"{candidate[:100]}-{adapter_id:x}"

    def _make_room_locked(self, *, by_request: bool) -> AdapterEntry | None:
        # Loads in flight do not count: they take a slot only once their file has been read and checked.
        if not self.max_loaded or len(self._by_id) < self.max_loaded:
            return None
        only_requests = by_request and self.reserve_admin_adapters
        for entry in self._by_id.values():  # least recently used first
            if not entry.pinned and entry.in_use == 0 and (entry.by_request or not only_requests):
                self._remove_locked(entry)
                return entry
        held = "pinned, in use or loaded by an admin" if only_requests else "pinned or in use"
        raise ResourceExhausted(
            f"all {self.max_loaded} adapter slots (--max-loaded-adapters) are {held}; unload one or retry later"
        )

    def _remove_locked(self, entry: AdapterEntry) -> None:
        del self._by_id[entry.id]
        del self._by_name[entry.name]
        del self._by_key[entry.key]
        self._tier_counts[entry.tier] -= 1


def _where(key: AdapterKey) -> str:
    path, expert = key
    return shown(path) + (f" (into {expert})" if expert else "")
