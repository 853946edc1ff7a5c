"""`omni-grpc cluster` on a real local Ray cluster (two CPU replicas of the tiny model): the same contract through
Serve's gRPC proxy, with the same bytes as one server; errors with their status; admin RPCs cluster-wide;
requests for an adapter landing on the replica that holds it."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from omni_grpc.loopback import free_port, spawn_omni, stop_process
from omni_grpc.v1 import omni_pb2 as pb
from omni_grpc.v1 import omni_pb2_grpc
from tests.helpers import InProcessServer, field_violation
from tests.test_tiers import write_adapter

pytest.importorskip("ray.serve", reason="the cluster extra (ray[serve]) is not installed")

REPLICAS = 2
TOKEN = "cluster-secret"
ADMIN = (("authorization", f"Bearer {TOKEN}"),)


class Cluster:
    def __init__(self, stub: omni_pb2_grpc.OmniServiceStub, loras: Path, log: Path, ray_dir: Path) -> None:
        self.stub = stub
        self.loras = loras
        self.log = log
        self.ray_dir = ray_dir

    def replica_log_lines(self) -> list[str]:
        """The replicas' log lines (their stderr, which Ray keeps with the session's logs)."""
        lines: list[str] = []
        for path in (self.ray_dir / "session_latest" / "logs").glob("worker-*.err"):
            lines += path.read_text(errors="replace").splitlines()
        return lines


@pytest.fixture(scope="module")
def cluster(cache_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    loras = tmp_path_factory.mktemp("cluster-loras")
    logs = tmp_path_factory.mktemp("cluster-logs")
    # Ray's socket paths must stay short: its files go to a folder of their own under /tmp.
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    port = free_port()
    command = [
        "cluster",
        "--replicas",
        str(REPLICAS),
        "--port",
        str(port),
        "--http-port",
        str(free_port()),
        "--ray-temp-dir",
        ray_dir,
        "--cpus-per-replica",
        "0.5",
        "--cache-dir",
        str(cache_root),
        "--lora-dirs",
        str(loras),
        "--metrics-port",
        "0",
        "--admin-token",
        TOKEN,
        # Small bounds, so that Serve's backpressure shows: 4 calls at once per replica, 2 waiting.
        "--max-ongoing-requests",
        "4",
        "--max-queued-requests",
        "2",
    ]
    proc = spawn_omni(command, log_path=logs / "cluster.log")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = omni_pb2_grpc.OmniServiceStub(channel)
    try:
        end = time.monotonic() + 400
        while True:
            assert proc.poll() is None, (logs / "cluster.log").read_text()
            try:
                if len(stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5).replicas) == REPLICAS:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < end, "the cluster did not come up:\n" + (logs / "cluster.log").read_text()
            time.sleep(1)
        yield Cluster(stub, loras, logs / "cluster.log", Path(ray_dir))
    finally:
        channel.close()
        stop_process(proc, timeout=120)
        shutil.rmtree(ray_dir, ignore_errors=True)


def request(seed: int, adapter: Path | None = None, side: int = 32) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(height=side, width=side, num_inference_steps=2, seed=seed)
    lora = pb.LoraRequest(path=str(adapter)) if adapter is not None else None
    return pb.GenerateRequest(prompt="a lighthouse", sampling_params=sampling, lora_request=lora)


def eventually(check, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    """Replicas apply the registry's changes within a second: wait for it, boundedly."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > end:
            return value
        time.sleep(0.2)


def test_the_cluster_names_its_replicas_and_serves_one_servers_bytes(
    cluster: Cluster, server: InProcessServer, tmp_path: Path
) -> None:
    info = cluster.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    assert info.family == "sd3" and len(set(info.replicas)) == REPLICAS
    adapter = write_adapter(cluster.loras / "bytes", seed=5)
    single_adapter = write_adapter(tmp_path / "bytes", seed=5)
    for through, alone in ((request(3), request(3)), (request(4, adapter), request(4, single_adapter))):
        got = cluster.stub.Generate(through, timeout=120)
        want = server.stub.Generate(alone, timeout=120)
        assert got.images[0].data == want.images[0].data
        assert got.replica in info.replicas
    streamed = list(cluster.stub.GenerateStream(pb.GenerateStreamRequest(request=request(3)), timeout=120))
    assert streamed[-1].result.images[0].data == server.stub.Generate(request(3), timeout=120).images[0].data
    assert [e.WhichOneof("event") for e in streamed][:2] == ["queued", "started"]


def test_errors_keep_their_status_and_field(cluster: Cluster) -> None:
    bad = pb.GenerateRequest(prompt="x", sampling_params=pb.SamplingParams(num_inference_steps=100_000))
    with pytest.raises(grpc.RpcError) as refused:
        cluster.stub.Generate(bad, timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violation(refused.value) == "sampling_params.num_inference_steps"
    with pytest.raises(grpc.RpcError) as missing:
        cluster.stub.Generate(request(1, cluster.loras / "absent"), timeout=60)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "does not exist" in missing.value.details()
    with pytest.raises(grpc.RpcError) as stream_refused:
        list(cluster.stub.GenerateStream(pb.GenerateStreamRequest(request=bad), timeout=60))
    assert stream_refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_requests_for_an_adapter_land_where_it_is(cluster: Cluster) -> None:
    adapter = write_adapter(cluster.loras / "sticky", seed=6)
    served = {cluster.stub.Generate(request(seed, adapter), timeout=120).replica for seed in range(6)}
    assert len(served) == 1
    # Without adapters, requests spread over the replicas.
    spread = {cluster.stub.Generate(request(seed), timeout=120).replica for seed in range(16)}
    assert len(spread) == REPLICAS


def test_admin_rpcs_act_on_every_replica(cluster: Cluster) -> None:
    adapter = write_adapter(cluster.loras / "everywhere", seed=7)
    load = pb.LoadAdapterRequest(path=str(adapter), name="everywhere", pin=True)
    # Admin calls need the token, as on one server.
    for call, message in (
        (cluster.stub.LoadAdapter, load),
        (cluster.stub.UnloadAdapter, pb.UnloadAdapterRequest(name="x")),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            call(message, timeout=60)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED and "is an admin call" in refused.value.details()
    loaded = cluster.stub.LoadAdapter(load, timeout=120, metadata=ADMIN)
    assert loaded.adapter.name == "everywhere"

    def residency() -> dict[str, int]:
        listing = cluster.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30, metadata=ADMIN).adapters
        entries = [a for a in listing if a.name == "everywhere"]
        assert len(entries) <= 1  # each adapter once, whatever the replicas
        return {r.replica: r.tier for r in entries[0].residency} if entries else {}

    held = eventually(lambda: len(residency()) == REPLICAS and residency())
    assert held and set(held.values()) == {pb.ADAPTER_TIER_DEVICE}
    # Paths are for admins only.
    anonymous = cluster.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30).adapters
    assert anonymous and all(a.path == "" for a in anonymous)
    removed = cluster.stub.UnloadAdapter(pb.UnloadAdapterRequest(name="everywhere"), timeout=60, metadata=ADMIN)
    assert removed.adapter.name == "everywhere"
    assert eventually(lambda: residency() == {})
    with pytest.raises(grpc.RpcError) as gone:
        cluster.stub.UnloadAdapter(pb.UnloadAdapterRequest(name="everywhere"), timeout=60, metadata=ADMIN)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def replica_pids() -> list[int]:
    """The replicas' worker processes (Ray names them in their process title)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "ServeReplica:omni:OmniReplica" in cmdline:
            found.append(proc.info["pid"])
    return found


def test_cancelling_a_call_stops_the_work_on_its_replica(cluster: Cluster) -> None:
    sampling = pb.SamplingParams(height=32, width=32, num_inference_steps=600, seed=1)
    call = cluster.stub.GenerateStream(
        pb.GenerateStreamRequest(request=pb.GenerateRequest(prompt="cancel me", sampling_params=sampling)), timeout=120
    )
    for event in call:
        if event.HasField("step") and event.step.step >= 2:
            break
    call.cancel()
    line = eventually(
        lambda: next((x for x in cluster.replica_log_lines() if "steps=600 " in x and "CANCELLED" in x), None), 60
    )
    assert line is not None and "steps_done=600" not in line


def test_a_deadline_stops_the_work_on_its_replica(cluster: Cluster) -> None:
    sampling = pb.SamplingParams(height=32, width=32, num_inference_steps=700, seed=1)
    with pytest.raises(grpc.RpcError) as late:
        cluster.stub.Generate(pb.GenerateRequest(prompt="too late", sampling_params=sampling), timeout=3)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    line = eventually(
        lambda: next((x for x in cluster.replica_log_lines() if "steps=700 " in x and "outcome=" in x), None), 60
    )
    assert line is not None and "steps_done=700" not in line


def outcomes_of(calls: list[grpc.Future]) -> list[tuple[str, str]]:
    """Each call's status name and details, once it ended (every call is allowed its time)."""
    outcomes = []
    for call in calls:
        try:
            call.result(timeout=180)
            outcomes.append(("OK", ""))
        except grpc.RpcError as exc:
            outcomes.append((exc.code().name, exc.details() or ""))
    return outcomes


def test_serves_backpressure_is_resource_exhausted(cluster: Cluster) -> None:
    sampling = pb.SamplingParams(height=32, width=32, num_inference_steps=150, seed=3)
    calls = [
        cluster.stub.Generate.future(pb.GenerateRequest(prompt=f"flood {i}", sampling_params=sampling), timeout=180)
        for i in range(20)
    ]
    outcomes = outcomes_of(calls)
    assert {code for code, _ in outcomes} == {"OK", "RESOURCE_EXHAUSTED"}, outcomes
    assert all("at capacity" in details for code, details in outcomes if code == "RESOURCE_EXHAUSTED")


def test_a_killed_replica_fails_only_its_calls_and_is_replaced(cluster: Cluster) -> None:
    adapter = write_adapter(cluster.loras / "survivor", seed=8)
    assert cluster.stub.Generate(request(1, adapter), timeout=120).replica
    sampling = pb.SamplingParams(height=32, width=32, num_inference_steps=300, seed=2)
    calls = []
    for i in range(4):  # well within the replicas' bounds (4 each, 2 waiting): no backpressure here
        calls.append(
            cluster.stub.Generate.future(pb.GenerateRequest(prompt=f"busy {i}", sampling_params=sampling), timeout=180)
        )
        time.sleep(0.3)  # paced, so that each is routed before the next (no timing is asserted)
    time.sleep(1.0)  # let them start
    victim = replica_pids()[0]
    os.kill(victim, signal.SIGKILL)
    codes = {code for code, _ in outcomes_of(calls)}
    assert codes == {"OK", "UNAVAILABLE"}, codes
    # The adapter it may have held is served elsewhere (UNAVAILABLE is retriable: a client retries once), and
    # Serve brings the cluster back to two replicas.
    try:
        again = cluster.stub.Generate(request(3, adapter), timeout=120)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE
        again = cluster.stub.Generate(request(3, adapter), timeout=120)
    assert again.images
    back = eventually(lambda: len(replica_pids()) == REPLICAS and victim not in replica_pids(), 300)
    assert back
