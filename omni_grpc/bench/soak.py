"""`omni-grpc soak`: a bounded load/generate/unload soak against a real server on loopback.

It starts `omni-grpc serve` as a subprocess (free 127.0.0.1 port, its own adapter folder as --lora-dirs, a
random admin token), writes K adapters for the embedded default model, and runs cycles of
LoadAdapter -> Generate (that adapter, by name) -> UnloadAdapter from several client threads until
--cycles or --duration is reached. Every 20th cycle also sends one bad request that must get exactly
its status. It reports request counts, errors by status, latency percentiles, the server's resident
memory after warm-up and at the end, and the server's exit code after SIGTERM.

Each client owns a disjoint subset of the adapters, so cycles never race on one adapter: every error
on a good request is a real failure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omni_grpc.loopback import free_port, spawn_omni, stop_process, wait_serving

BAD_EVERY = 20
# The bad requests, in turn: what is sent, and the one status it must get.
BAD_KINDS = (
    ("missing_path", "NOT_FOUND"),
    ("outside_lora_dirs", "PERMISSION_DENIED"),
    ("no_admin_token", "UNAUTHENTICATED"),
)
RPC_TIMEOUT_S = 60.0


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cycles", type=int, default=1000, help="stop after this many cycles")
    parser.add_argument("--duration", type=float, default=120.0, help="or after this many seconds, whichever first")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads running cycles")
    parser.add_argument("--adapters", type=int, default=8, help="adapters written and cycled (>= --concurrency)")
    parser.add_argument(
        "--rank", type=int, default=64, help="adapter rank (64: 128 KiB each, so a leak per cycle shows in RSS)"
    )
    parser.add_argument("--warmup", type=int, default=20, help="cycles before the first memory reading")
    parser.add_argument("--cache-dir", type=Path, default=None, help="passed to the server (embedded model cache)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here as JSON")
    parser.add_argument("--server-log", type=Path, default=None, help="keep the server's log here")


@dataclass
class Stats:
    """Everything the clients record; every update under `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    started: int = 0  # cycles claimed
    done: int = 0  # cycles finished, good or not
    served: Counter[str] = field(default_factory=Counter)  # successful calls by RPC
    expected: Counter[str] = field(default_factory=Counter)  # statuses the bad requests got, as required
    unexpected: Counter[str] = field(default_factory=Counter)  # any other error, or a bad request let through
    bad_sent: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # the first few unexpected errors, for the report
    generate_ms: list[float] = field(default_factory=list)
    cycle_ms: list[float] = field(default_factory=list)
    rss_samples: list[tuple[int, float]] = field(default_factory=list)  # (cycles done, MiB)

    def fail(self, what: str, status: str, detail: str) -> None:
        with self.lock:
            self.unexpected[status] += 1
            if len(self.failures) < 10:
                self.failures.append(f"{what}: {status}: {detail}")


def rss_mib(pid: int) -> float:
    """Resident memory (VmRSS) of process `pid`, in MiB."""
    return _status_kib(pid, "VmRSS") / 1024


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class Soak:
    def __init__(
        self, args: argparse.Namespace, target: str, proc: subprocess.Popen[bytes], adapters: list[Path], lora_dir: Path
    ) -> None:
        self.args = args
        self.target = target
        self.proc = proc
        self.adapters = adapters
        self.lora_dir = lora_dir
        self.token = ""
        self.stats = Stats()
        self.deadline = 0.0
        self.rss_start: float | None = None
        self.cycles_s = 0.0

    def run(self, token: str) -> None:
        self.token = token
        started = time.monotonic()
        self.deadline = started + self.args.duration
        threads = [
            threading.Thread(target=self._client, args=(i,), name=f"soak-{i}") for i in range(self.args.concurrency)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.cycles_s = time.monotonic() - started

    def _claim(self) -> int | None:
        with self.stats.lock:
            if self.stats.started >= self.args.cycles or time.monotonic() >= self.deadline:
                return None
            if self.proc.poll() is not None:  # the server died: every further call would fail the same way
                return None
            self.stats.started += 1
            return self.stats.started - 1

    def _client(self, index: int) -> None:
        import grpc

        from omni_grpc.v1 import omni_pb2_grpc

        # Client i owns adapters i, i + C, i + 2C, ...: no two clients ever touch the same one.
        mine = self.adapters[index :: self.args.concurrency]
        with grpc.insecure_channel(self.target) as channel:
            stub = omni_pb2_grpc.OmniServiceStub(channel)
            turn = 0
            while (number := self._claim()) is not None:
                self._cycle(stub, number, mine[turn % len(mine)])
                turn += 1
                if number % BAD_EVERY == BAD_EVERY - 1:
                    self._bad_request(stub, number // BAD_EVERY)
                self._finish_cycle()

    def _finish_cycle(self) -> None:
        s = self.stats
        with s.lock:
            s.done += 1
            done = s.done
        # Sampled outside the lock: reading /proc takes a moment.
        if done == self.args.warmup or done % 50 == 0:
            try:
                mib = rss_mib(self.proc.pid)
            except OSError as exc:
                s.fail(f"memory reading after cycle {done}", "SERVER_GONE", str(exc))
                return
            with s.lock:
                if done == self.args.warmup:
                    self.rss_start = mib
                s.rss_samples.append((done, mib))

    def _cycle(self, stub: Any, number: int, adapter: Path) -> None:
        import grpc

        from omni_grpc.v1 import omni_pb2 as pb

        auth = (("authorization", f"Bearer {self.token}"),)
        name = adapter.name
        started = time.perf_counter()
        steps: tuple[tuple[str, Any, Any, Any], ...] = (
            ("LoadAdapter", stub.LoadAdapter, pb.LoadAdapterRequest(path=str(adapter), name=name), auth),
            (
                "Generate",
                stub.Generate,
                pb.GenerateRequest(
                    prompt=f"soak cycle {number}",
                    sampling_params=pb.SamplingParams(height=64, width=64, num_inference_steps=1, seed=number),
                    lora_request=pb.LoraRequest(name=name, scale=1.0),
                ),
                (),
            ),
            ("UnloadAdapter", stub.UnloadAdapter, pb.UnloadAdapterRequest(name=name), auth),
        )
        for rpc, method, request, metadata in steps:
            call_started = time.perf_counter()
            try:
                response = method(request, metadata=metadata, timeout=RPC_TIMEOUT_S)
            except grpc.RpcError as exc:
                self.stats.fail(f"cycle {number} {rpc} {name}", exc.code().name, exc.details() or "")
                if rpc == "LoadAdapter":
                    return  # nothing to generate with or unload
                continue
            elapsed = (time.perf_counter() - call_started) * 1000
            with self.stats.lock:
                self.stats.served[rpc] += 1
                if rpc == "Generate":
                    self.stats.generate_ms.append(elapsed)
            if rpc == "Generate" and (len(response.images) != 1 or not response.images[0].data):
                self.stats.fail(f"cycle {number} Generate {name}", "BAD_RESPONSE", "expected one image")
        with self.stats.lock:
            self.stats.cycle_ms.append((time.perf_counter() - started) * 1000)

    def _bad_request(self, stub: Any, turn: int) -> None:
        import grpc

        from omni_grpc.v1 import omni_pb2 as pb

        kind, want = BAD_KINDS[turn % len(BAD_KINDS)]
        auth: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {self.token}"),)
        if kind == "missing_path":
            request = pb.LoadAdapterRequest(path=str(self.lora_dir / f"missing-{turn}"), name=f"missing-{turn}")
        elif kind == "outside_lora_dirs":
            request = pb.LoadAdapterRequest(path="/etc", name=f"outside-{turn}")
        else:
            # A real adapter: only the missing token is wrong.
            request = pb.LoadAdapterRequest(path=str(self.adapters[0]), name=f"no-token-{turn}")
            auth = ()
        with self.stats.lock:
            self.stats.bad_sent[kind] += 1
        try:
            stub.LoadAdapter(request, metadata=auth, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            got = exc.code().name
            if got == want:
                with self.stats.lock:
                    self.stats.expected[got] += 1
            else:
                self.stats.fail(f"bad request {kind}", got, f"expected {want}: {exc.details()}")
            return
        self.stats.fail(f"bad request {kind}", "OK", f"expected {want}, the load succeeded")


def _spawn_server(
    args: argparse.Namespace, lora_dir: Path, token: str, log_path: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = ["serve", "--host", "127.0.0.1", f"--port={port}", "--metrics-port=0", f"--lora-dirs={lora_dir}"]
    if args.cache_dir is not None:
        command.append(f"--cache-dir={args.cache_dir}")
    # The token goes by environment, not argv, where any local user could read it from `ps`.
    proc = spawn_omni(command, log_path=log_path, env={"OMNI_GRPC_ADMIN_TOKEN": token})
    return proc, f"127.0.0.1:{port}"


def _wait_serving(proc: subprocess.Popen[bytes], target: str) -> None:
    import grpc

    with grpc.insecure_channel(target) as channel:
        wait_serving(channel, alive=lambda: proc.poll() is None)


def figures(soak: Soak, rss_end: float, server_exit: int, wall_s: float) -> dict[str, Any]:
    s = soak.stats
    rss_start = soak.rss_start if soak.rss_start is not None else rss_end
    warm = s.generate_ms[soak.args.warmup :] or s.generate_ms
    tenth = max(len(warm) // 10, 1)
    early, late = warm[:tenth], warm[-tenth:]
    return {
        "cycles": s.done,
        "cycles_requested": soak.args.cycles,
        "concurrency": soak.args.concurrency,
        "adapters": len(soak.adapters),
        "served": dict(s.served),
        "bad_requests_sent": dict(s.bad_sent),
        "errors_expected": dict(s.expected),
        "errors_unexpected": dict(s.unexpected),
        "failures": list(s.failures),
        "generate_ms": {"p50": percentile(s.generate_ms, 50), "p99": percentile(s.generate_ms, 99)},
        "cycle_ms": {"p50": percentile(s.cycle_ms, 50), "p99": percentile(s.cycle_ms, 99)},
        # Generate p50 early and late (past warm-up): a table or layer that grows per cycle slows it down.
        "generate_p50_ms_early": percentile(early, 50),
        "generate_p50_ms_late": percentile(late, 50),
        "rss_mib": {
            "start": rss_start,
            "end": rss_end,
            "drift": rss_end - rss_start,
            "warmup_cycles": soak.args.warmup,
        },
        "rss_samples": [{"cycles": c, "mib": m} for c, m in s.rss_samples],
        "server_exit": server_exit,
        "cycles_s": soak.cycles_s,
        "wall_s": wall_s,
        # Other processes on the machine skew every latency here: the 1-minute load average at the end says so.
        "load_average_end": os.getloadavg()[0],
    }


def report(f: dict[str, Any]) -> str:
    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"

    rss = f["rss_mib"]
    lines = [
        f"soak: {f['cycles']} cycles ({f['concurrency']} clients, {f['adapters']} adapters) in {f['wall_s']:.1f} s",
        f"  served: {counts(f['served'])}",
        f"  bad requests sent: {counts(f['bad_requests_sent'])}",
        f"  errors, expected: {counts(f['errors_expected'])}",
        f"  errors, unexpected: {counts(f['errors_unexpected'])}",
        *(f"    {failure}" for failure in f["failures"]),
        f"  Generate ms: p50 {f['generate_ms']['p50']:.1f}, p99 {f['generate_ms']['p99']:.1f}",
        f"  cycle ms: p50 {f['cycle_ms']['p50']:.1f}, p99 {f['cycle_ms']['p99']:.1f}",
        f"  Generate p50 ms, first and last tenth after warm-up: {f['generate_p50_ms_early']:.1f}, "
        f"{f['generate_p50_ms_late']:.1f}",
        f"  server RSS MiB: {rss['start']:.1f} after {rss['warmup_cycles']} cycles, {rss['end']:.1f} at the end, "
        f"drift {rss['drift']:+.1f}",
        f"  server exit after SIGTERM: {f['server_exit']}",
        f"  wall time: {f['wall_s']:.1f} s ({f['cycles_s']:.1f} s of cycles, "
        f"{f['cycles'] / max(f['cycles_s'], 1e-9):.1f} cycles/s); machine load average {f['load_average_end']:.2f} "
        f"on {os.cpu_count()} cores",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.concurrency < 1 or args.cycles < 1 or args.adapters < args.concurrency:
        print("omni-grpc soak: need --cycles >= 1, --concurrency >= 1 and --adapters >= --concurrency", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="omni-soak-") as tmp:
        root = Path(tmp)
        lora_dir = root / "adapters"
        lora_dir.mkdir()
        token = secrets.token_hex(24)
        log_path = args.server_log or root / "server.log"
        proc, target = _spawn_server(args, lora_dir, token, log_path)
        try:
            # Heavy imports here (building the CLI parser must not import torch), while the server starts.
            from omni_grpc.bench.fixtures import write_adapter
            from omni_grpc.tiny_models.sd3 import TinySD3Spec

            spec = TinySD3Spec()
            adapters = [
                write_adapter(lora_dir / f"soak-{i:02d}", spec, rank=args.rank, seed=i) for i in range(args.adapters)
            ]
            _wait_serving(proc, target)
        except BaseException as exc:
            stop_process(proc)
            print(f"omni-grpc soak: {exc}\n--- server log (tail) ---\n{_tail(log_path)}", file=sys.stderr)
            if not isinstance(exc, RuntimeError):
                raise
            return 1
        soak = Soak(args, target, proc, adapters, lora_dir)
        try:
            soak.run(token)
            try:
                rss_end = rss_mib(proc.pid)
            except OSError as exc:
                soak.stats.fail("memory reading at the end", "SERVER_GONE", str(exc))
                rss_end = math.nan
        finally:
            server_exit = stop_process(proc)
        result = figures(soak, rss_end, server_exit, time.perf_counter() - started)
        print(report(result))
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(_strict(result), indent=2) + "\n")
        ok = not result["errors_unexpected"] and server_exit == 0 and result["cycles"] > 0
        if not ok:
            print(f"--- server log (tail) ---\n{_tail(log_path)}", file=sys.stderr)
        return 0 if ok else 1


def _strict(value: Any) -> Any:
    """NaN (no samples) as null, so that the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
