"""`omni-grpc bench --cluster`: a trace of requests over many adapters with a skewed (Zipf) popularity, on a
real local Ray Serve cluster of the embedded model, run four times: two replicas with adapter-affinity routing,
two with Serve's own router (the power of two choices, preferring replicas that reported the adapter), two with
plain load balancing that ignores adapters, and one replica. It reports adapter reads (first loads and
re-reads from disk) and the device-hit rate of each routing on the same trace, and the throughput with 1 and
2 replicas. Each replica keeps few adapters on the device (and none in host memory), so where a request lands
decides whether its adapter must be read again."""

from __future__ import annotations

import argparse
import concurrent.futures
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from omni_grpc.bench.fixtures import write_adapter
from omni_grpc.loopback import free_port, spawn_omni, stop_process, wait_replicas
from omni_grpc.tiny_models.sd3 import TinySD3Spec
from omni_grpc.v1 import omni_pb2 as pb
from omni_grpc.v1 import omni_pb2_grpc


@dataclass(frozen=True)
class TraceResult:
    label: str
    replicas: int
    requests: int
    seconds: float
    reads: int
    hits: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds


def zipf_trace(adapters: list[Path], requests: int, exponent: float = 1.1, seed: int = 0) -> list[Path]:
    weights = [1 / (rank + 1) ** exponent for rank in range(len(adapters))]
    return random.Random(seed).choices(adapters, weights=weights, k=requests)


def run_cluster_bench(args: argparse.Namespace, cache: Path) -> int:
    adapters_count, requests, device = (8, 24, 2) if args.quick or args.smoke else (32, 320, 4)
    with tempfile.TemporaryDirectory(prefix="omni-cluster-bench-") as tmp:
        root = Path(tmp)
        adapters = [
            write_adapter(root / "loras" / f"a{i}", TinySD3Spec(), rank=4, seed=i, magnitude=0.3)
            for i in range(adapters_count)
        ]
        trace = zipf_trace(adapters, requests)
        runs = [
            (2, "affinity", "2 replicas, adapter affinity (`--router affinity`)"),
            (2, "serve", "2 replicas, Serve's own router (`--router serve`)"),
            (2, "load", "2 replicas, load balancing only (`--router load`)"),
            (1, "affinity", "1 replica"),
        ]
        results = [
            _run(trace, cache, root, replicas=n, router=router, label=label, device=device) for n, router, label in runs
        ]
    print(
        f"trace: {requests} requests over {adapters_count} adapters (Zipf 1.1), 4 clients, 32x32, 2 steps, "
        f"{device} adapters on each replica's device"
    )
    print("| cluster | adapter reads | device-hit rate | requests/s |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r.label} | {r.reads} | {r.hit_rate:.2f} | {r.throughput:.2f} |")
    affinity, served, plain, single = results
    print(
        f"reads, affinity / Serve's router / load only: {affinity.reads} / {served.reads} / {plain.reads}; "
        f"throughput 2 / 1 replicas: {affinity.throughput / single.throughput:.2f}x"
    )
    return 0


def _run(
    trace: list[Path], cache: Path, root: Path, *, replicas: int, router: str, label: str, device: int
) -> TraceResult:
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    port = free_port()
    command = [
        "cluster",
        f"--replicas={replicas}",
        f"--port={port}",
        f"--http-port={free_port()}",
        f"--ray-temp-dir={ray_dir}",
        "--cpus-per-replica=0.5",
        f"--router={router}",
        f"--cache-dir={cache}",
        f"--lora-dirs={trace[0].parent}",
        f"--max-device-adapters={device}",
        "--max-host-adapters=0",
        "--metrics-port=0",
    ]
    proc = spawn_omni(command, log_path=root / f"cluster-{router}-{replicas}.log")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = omni_pb2_grpc.OmniServiceStub(channel)
    try:
        wait_replicas(channel, replicas, alive=lambda: proc.poll() is None)
        sampling = pb.SamplingParams(height=32, width=32, num_inference_steps=2, seed=1)

        def one(adapter: Path) -> None:
            request = pb.GenerateRequest(
                prompt="trace", sampling_params=sampling, lora_request=pb.LoraRequest(path=str(adapter))
            )
            stub.Generate(request, timeout=300)

        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(one, trace))
        seconds = time.perf_counter() - started
        time.sleep(1.5)  # the replicas' reports to the registry (every half second)
        listing = stub.ListAdapters(pb.ListAdaptersRequest(), timeout=60).adapters
        return TraceResult(
            label, replicas, len(trace), seconds, sum(a.loads for a in listing), sum(a.hits for a in listing)
        )
    finally:
        channel.close()
        stop_process(proc, timeout=120)
        shutil.rmtree(ray_dir, ignore_errors=True)
