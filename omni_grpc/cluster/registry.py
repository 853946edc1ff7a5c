"""The cluster's adapter registry, one Ray actor: what the admins loaded (every replica loads it too) and
unloaded (every replica unloads it), and what each replica last reported holding (for ListAdapters)."""

from __future__ import annotations

import time
from typing import Any

import ray

REGISTRY_NAME = "omni-grpc-adapter-registry"
# A replica that has not reported for this long is gone (killed, or scaled down).
REPORT_TTL_S = 15.0


class AdapterBook:
    """The registry's state and rules (a plain class: the actor below is this, remote)."""

    def __init__(self) -> None:
        self._version = 0
        # (path, expert) -> the LoadAdapter fields (path, name, id, pin, expert), in load order.
        self._loads: dict[tuple[str, str], dict[str, Any]] = {}
        # Unloads, each with the version it was made at: replicas apply those newer than what they saw. Those
        # every live replica has seen are dropped; `_floor` is the newest version dropped.
        self._unloads: list[tuple[int, dict[str, Any]]] = []
        self._floor = 0
        # Replica -> (when, its ListAdapters entries as serialized pb.Adapter, the version it had applied).
        self._reports: dict[str, tuple[float, list[bytes], int]] = {}

    def register(self, spec: dict[str, Any]) -> int:
        self._version += 1
        self._loads[(spec["path"], spec.get("expert") or "")] = spec
        return self._version

    def unregister(self, path: str, expert: str) -> int:
        self._version += 1
        self._loads.pop((path, expert), None)
        self._unloads.append((self._version, {"path": path, "expert": expert}))
        return self._version

    def changes_since(self, version: int) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]], bool]:
        """The current version, the admins' loads (all), the unloads made after `version`, and whether some of
        those were dropped already (a replica that was out of touch that long keeps only the admins' loads)."""
        if version == self._version:
            return version, [], [], False
        unloads = [spec for made, spec in self._unloads if made > version]
        return self._version, list(self._loads.values()), unloads, 0 < version < self._floor

    def report(self, replica: str, adapters: list[bytes], seen: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._reports[replica] = (now, adapters, seen)
        live = [version for when, _, version in self._reports.values() if now - when < REPORT_TTL_S]
        floor = min(live)
        if floor > self._floor:
            self._unloads = [(made, spec) for made, spec in self._unloads if made > floor]
            self._floor = floor

    def reports(self, now: float | None = None) -> dict[str, list[bytes]]:
        now = time.monotonic() if now is None else now
        return {name: adapters for name, (when, adapters, _) in self._reports.items() if now - when < REPORT_TTL_S}


# One actor per cluster, named: the ingress and every replica find it by name.
AdapterRegistry = ray.remote(num_cpus=0)(AdapterBook)
