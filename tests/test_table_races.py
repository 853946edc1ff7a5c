"""The adapter table's bookkeeping when tier moves race with unloads, and when housekeeping fails.

These drive the table through a small in-memory backend, since the point is the table's own locking
and counting; the real backend is exercised end to end in test_tiers.py and test_adapters.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from omni_grpc.engine.adapters import AdapterTable, LoadedAdapter, Tier
from omni_grpc.engine.types import AdapterFormat, LoraRequest
from tests.helpers import wait_for


class GatedBackend:
    """Holds slots by name; `move` can be paused half-way (read done, write pending) or made to fail."""

    def __init__(self) -> None:
        self.slots: dict[str, str] = {}
        self.gate: threading.Event | None = None
        self.inside = threading.Event()
        self.fail_moves = False
        # Internal names whose move is under way (paused at the gate).
        self.moving: set[str] = set()

    def load(self, path: str, internal_name: str, expert: str = "") -> LoadedAdapter:
        self.slots[internal_name] = "device"
        return LoadedAdapter(AdapterFormat.PEFT, 4, 4.0, ["to_q"], 10, 1)

    def unload(self, internal_name: str) -> None:
        self.slots.pop(internal_name, None)

    def move(self, internal_name: str, tier: Tier) -> None:
        if internal_name not in self.slots:
            return
        if self.gate is not None:
            self.moving.add(internal_name)
            self.inside.set()
            self.gate.wait(10)
            self.moving.discard(internal_name)
        if self.fail_moves:
            raise RuntimeError("out of memory while pinning host memory")
        self.slots[internal_name] = tier.value


def actual_counts(table: AdapterTable) -> dict[str, int]:
    counts = dict.fromkeys(("device", "host", "disk"), 0)
    for info in table.list():
        counts[info.tier] += 1
    return counts


@pytest.fixture
def paths(tmp_path: Path) -> list[str]:
    folders = [tmp_path / f"a{i}" for i in range(4)]
    for folder in folders:
        folder.mkdir()
    return [str(f) for f in folders]


def test_unload_during_a_move_down_leaves_no_slot_and_true_counts(paths: list[str]) -> None:
    backend = GatedBackend()
    table = AdapterTable(backend, max_device=1, max_host=4)
    table.load(paths[0])
    backend.gate = threading.Event()
    loader = threading.Thread(target=lambda: table.load(paths[1]))  # demotes a0 to host, paused mid-move
    loader.start()
    assert backend.inside.wait(10), "the load never moved a0 down"
    unloader = threading.Thread(target=lambda: table.unload(name="a0"))
    unloader.start()
    # The unload has taken a0 out of the table while its move is still paused half-way: the race happened.
    wait_for(lambda: "a0" not in {i.name for i in table.list()})
    assert len(backend.moving) == 1
    backend.gate.set()
    loader.join(10)
    unloader.join(10)
    assert not loader.is_alive() and not unloader.is_alive()
    assert [i.name for i in table.list()] == ["a1"]
    assert table.tier_counts() == actual_counts(table) == {"device": 1, "host": 0, "disk": 0}
    assert len(backend.slots) == 1  # a0's slot did not come back


def test_unload_during_a_promotion_keeps_counts_true(paths: list[str]) -> None:
    backend = GatedBackend()
    table = AdapterTable(backend, max_device=1, max_host=4)
    table.load(paths[0])
    table.load(paths[1])  # a0 moves to host
    assert {i.name: i.tier for i in table.list()} == {"a0": "host", "a1": "device"}
    backend.gate = threading.Event()
    holder = threading.Thread(target=lambda: table.acquire(LoraRequest(name="a0")).release())
    holder.start()
    assert backend.inside.wait(10), "the request never promoted a0"
    table.unload(name="a0")  # held: removed now, detached when the holder releases
    # Removed while its promotion is paused half-way: the race happened.
    assert "a0" not in {i.name for i in table.list()} and backend.moving
    backend.gate.set()
    holder.join(10)
    assert not holder.is_alive()
    assert table.tier_counts() == actual_counts(table) == {"device": 1, "host": 0, "disk": 0}
    assert "a1" in {i.name for i in table.list()} and table.list()[0].tier == "device"
    assert len(backend.slots) == 1


def test_a_failing_move_down_does_not_fail_or_leak_the_request(paths: list[str]) -> None:
    backend = GatedBackend()
    table = AdapterTable(backend, max_device=1, max_host=4)
    table.load(paths[0])
    backend.fail_moves = True
    lease = table.acquire(LoraRequest(path=paths[1]))  # wants to demote a0, which fails: still served
    lease.release()
    assert {i.name: i.in_use for i in table.list()} == {"a0": 0, "a1": 0}
    backend.fail_moves = False
    table.acquire(LoraRequest(name="a1")).release()  # the next admission restores the bound
    assert table.tier_counts() == actual_counts(table) == {"device": 1, "host": 1, "disk": 0}


class PickyBackend(GatedBackend):
    """Refuses the folders whose name starts with "bad", after a pause (as a real read would take)."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = threading.Barrier(3)

    def load(self, path: str, internal_name: str, expert: str = "") -> LoadedAdapter:
        if Path(path).name.startswith("bad"):
            self.reading.wait(10)  # three bad loads in flight at once
            raise ValueError(f"{path} is not an adapter")
        return super().load(path, internal_name, expert)


def test_failed_loads_never_evict_an_adapter_nor_take_a_slot(tmp_path: Path) -> None:
    good = [tmp_path / name for name in ("pinned", "idle")]
    bad = [tmp_path / f"bad{i}" for i in range(3)]
    for folder in good + bad:
        folder.mkdir()
    backend = PickyBackend()
    table = AdapterTable(backend, max_loaded=3)
    table.load(str(good[0]), pin=True)
    table.load(str(good[1]))
    errors: list[BaseException] = []

    def load_bad(path: Path) -> None:
        try:
            table.load(str(path))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=load_bad, args=(path,)) for path in bad]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    # Each got its own error (none a RESOURCE_EXHAUSTED for slots taken by loads in flight) ...
    assert sorted(type(e).__name__ for e in errors) == ["ValueError"] * 3
    # ... and the idle adapter is still there: one free slot, untouched.
    assert {info.name for info in table.list()} == {"pinned", "idle"}
    assert len(backend.slots) == 2
