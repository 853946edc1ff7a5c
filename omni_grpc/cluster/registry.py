"""The cluster's adapter registry, one Ray actor: what the admins loaded (every replica loads it too) and
unloaded (every replica unloads it), and what each replica last reported holding (for ListAdapters)."""

from __future__ import annotations

import time
from typing import Any

import ray

REGISTRY_NAME = "omni-grpc-adapter-registry"
# A replica that has not reported for this long is gone (killed, or scaled down).
REPORT_TTL_S = 15.0


@ray.remote(num_cpus=0)
class AdapterRegistry:
    def __init__(self) -> None:
        self._version = 0
        # (path, expert) -> the LoadAdapter fields (path, name, id, pin, expert), in load order.
        self._loads: dict[tuple[str, str], dict[str, Any]] = {}
        # Unloads, each with the version it was made at: replicas apply those newer than what they saw.
        self._unloads: list[tuple[int, dict[str, Any]]] = []
        # Replica -> (when, its ListAdapters entries as serialized pb.Adapter).
        self._reports: dict[str, tuple[float, list[bytes]]] = {}

    def register(self, spec: dict[str, Any]) -> int:
        self._version += 1
        self._loads[(spec["path"], spec.get("expert") or "")] = spec
        return self._version

    def unregister(self, path: str, expert: str) -> int:
        self._version += 1
        self._loads.pop((path, expert), None)
        self._unloads.append((self._version, {"path": path, "expert": expert}))
        return self._version

    def changes_since(self, version: int) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]]]:
        """The current version, the admins' loads (all), and the unloads made after `version`."""
        return self._version, list(self._loads.values()), [spec for made, spec in self._unloads if made > version]

    def report(self, replica: str, adapters: list[bytes]) -> None:
        self._reports[replica] = (time.monotonic(), adapters)

    def reports(self) -> dict[str, list[bytes]]:
        now = time.monotonic()
        return {name: adapters for name, (when, adapters) in self._reports.items() if now - when < REPORT_TTL_S}
