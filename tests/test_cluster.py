"""`omni-grpc cluster` on a real local Ray cluster (CPU replicas of the tiny model, autoscaled from one to two):
the same contract through Serve's gRPC proxy, with the same bytes as one server; errors with their status;
admin RPCs cluster-wide; requests for an adapter landing on the replica that holds it, and spilling when it is
full; deadlines, cancellation, backpressure and a killed replica."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import psutil
import pytest

from omni_grpc.loopback import free_port, spawn_omni, stop_process, wait_replicas
from omni_grpc.v1 import omni_pb2 as pb
from omni_grpc.v1 import omni_pb2_grpc
from tests.helpers import InProcessServer, field_violation, write_adapter

pytest.importorskip("ray.serve", reason="the cluster extra (ray[serve]) is not installed")

REPLICAS = 2
T = TypeVar("T")
TOKEN = "cluster-secret"
ADMIN = (("authorization", f"Bearer {TOKEN}"),)


class Cluster:
    def __init__(
        self,
        stub: omni_pb2_grpc.OmniServiceStub,
        port: int,
        loras: Path,
        log: Path,
        ray_dir: Path,
        scaled: tuple[int, int],
    ) -> None:
        self.stub = stub
        self.port = port
        self.loras = loras
        self.log = log
        self.ray_dir = ray_dir
        # The replicas the cluster started with, and had once the autoscaler saw load.
        self.scaled = scaled

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
        # Autoscaling from one replica to two, at once under load (the tests then run on two).
        "--min-replicas",
        "1",
        "--max-replicas",
        str(REPLICAS),
        "--target-ongoing-requests",
        "1",
        "--upscale-delay-s",
        "0",
        "--autoscale-window-s",
        "2",
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
        alive = lambda: proc.poll() is None  # noqa: E731
        try:
            at_start = wait_replicas(channel, 1, timeout=400, alive=alive)
            scaled = replicas_under_load(channel, alive)
        except RuntimeError as exc:
            pytest.fail(f"{exc}:\n{(logs / 'cluster.log').read_text()}")
        yield Cluster(stub, port, loras, logs / "cluster.log", Path(ray_dir), (at_start, scaled))
    finally:
        channel.close()
        stop_process(proc, timeout=120)
        shutil.rmtree(ray_dir, ignore_errors=True)


def replicas_under_load(channel: grpc.Channel, alive: Callable[[], bool]) -> int:
    """Keep the cluster busy (four long calls at a time) until the autoscaler has added the second replica."""
    stub = omni_pb2_grpc.OmniServiceStub(channel)
    stop = threading.Event()
    sampling = pb.SamplingParams(height=32, width=32, num_inference_steps=200, seed=1)

    def busy() -> None:
        while not stop.is_set():
            with contextlib.suppress(grpc.RpcError):  # backpressure, while one replica takes it all
                stub.Generate(pb.GenerateRequest(prompt="load", sampling_params=sampling), timeout=120)

    workers = [threading.Thread(target=busy) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        return wait_replicas(channel, REPLICAS, timeout=400, alive=alive)
    finally:
        stop.set()
        for worker in workers:
            worker.join(180)


def request(seed: int, adapter: Path | None = None, side: int = 32) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(height=side, width=side, num_inference_steps=2, seed=seed)
    lora = pb.LoraRequest(path=str(adapter)) if adapter is not None else None
    return pb.GenerateRequest(prompt="a lighthouse", sampling_params=sampling, lora_request=lora)


def eventually(check: Callable[[], T], timeout: float = 30.0) -> T:
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


def test_the_autoscaler_adds_a_replica_under_load(cluster: Cluster) -> None:
    assert cluster.scaled == (1, REPLICAS)
    info = cluster.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    assert len(info.replicas) == REPLICAS


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
    # Concurrent first requests for a new adapter agree on one replica (they see the same state: no holder yet),
    # instead of loading it on every replica. Two at a time (Serve queues two): three new adapters.
    for i in range(3):
        fresh = write_adapter(cluster.loras / f"fresh{i}", seed=20 + i)
        calls = [cluster.stub.Generate.future(request(seed, fresh), timeout=120) for seed in range(2)]
        assert len({call.result().replica for call in calls}) == 1
    # Without adapters, requests spread over the replicas.
    spread = {cluster.stub.Generate(request(seed), timeout=120).replica for seed in range(16)}
    assert len(spread) == REPLICAS


def test_a_second_cluster_on_a_port_in_use_exits_with_an_error(cluster: Cluster, tmp_path: Path) -> None:
    # Serve's proxies would share the port (SO_REUSEPORT) and take half its connections: refused up front.
    log = tmp_path / "second.log"
    second = spawn_omni(["cluster", "--port", str(cluster.port), "--http-port", str(free_port())], log_path=log)
    assert second.wait(120) == 1
    assert f"cannot listen on port {cluster.port} (--port" in log.read_text()
    assert cluster.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30).replicas  # the first one serves on


def test_a_hot_adapter_spills_to_a_second_replica(cluster: Cluster) -> None:
    adapter = write_adapter(cluster.loras / "hot", seed=9)
    home = cluster.stub.Generate(request(1, adapter), timeout=120).replica
    # Six long calls at once: its replica takes four (--max-ongoing-requests), the next in line the rest.
    sampling = pb.SamplingParams(height=32, width=32, num_inference_steps=150, seed=2)
    hot = pb.GenerateRequest(prompt="hot", sampling_params=sampling, lora_request=pb.LoraRequest(path=str(adapter)))
    calls = []
    for _ in range(6):
        calls.append(cluster.stub.Generate.future(hot, timeout=180))
        time.sleep(0.3)  # paced, so that each is routed before the next: none waits in Serve's queue (2 at most)
    served = [call.result().replica for call in calls]
    assert home in served and len(set(served)) == REPLICAS, served


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
    mine = "\n".join(x for x in cluster.replica_log_lines() if "steps=600 " in x)
    assert line is not None and "steps_done=600" not in line, f"this request's lines: {mine or 'none'}"


def test_a_deadline_reaches_the_replica(cluster: Cluster) -> None:
    sampling = pb.SamplingParams(height=32, width=32, num_inference_steps=700, seed=1)
    with pytest.raises(grpc.RpcError) as late:
        cluster.stub.Generate(pb.GenerateRequest(prompt="too late", sampling_params=sampling), timeout=3)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    line = eventually(
        lambda: next((x for x in cluster.replica_log_lines() if "steps=700 " in x and "outcome=" in x), None), 60
    )
    # The replica knew the deadline (not only a cancellation at that moment), and stopped the work by it.
    assert line is not None and "outcome=DEADLINE_EXCEEDED" in line and "steps_done=700" not in line


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


def test_the_registry_drops_unloads_every_live_replica_has_seen() -> None:
    from omni_grpc.cluster.registry import REPORT_TTL_S, AdapterBook

    book = AdapterBook()
    b = {"path": "/l/b", "name": "b", "id": 2, "pin": False, "expert": ""}
    book.register({"path": "/l/a", "name": "a", "id": 1, "pin": False, "expert": ""})
    loaded = book.register(b)
    book.report("r1", [], seen=loaded, now=100.0)
    book.report("r2", [], seen=loaded, now=100.0)
    gone = book.unregister("/l/a", "")
    assert book.changes_since(0) == (gone, [b], [{"path": "/l/a", "expert": ""}], False)
    assert book.changes_since(gone) == (gone, [], [], False)  # nothing new: nothing sent
    book.report("r1", [], seen=gone, now=100.5)
    # r2 has not seen the unload yet: it is kept for it.
    assert book.changes_since(loaded) == (gone, [b], [{"path": "/l/a", "expert": ""}], False)
    book.report("r2", [], seen=gone, now=101.0)  # every live replica has seen it: dropped
    later = book.unregister("/l/b", "")
    assert book.changes_since(gone) == (later, [], [{"path": "/l/b", "expert": ""}], False)
    # A replica out of touch since before the dropped unload is told so (it keeps only the admins' loads).
    assert book.changes_since(loaded) == (later, [], [{"path": "/l/b", "expert": ""}], True)
    # A replica that stopped reporting is no longer listed, and no longer holds unloads back.
    book.report("r1", [], seen=later, now=101.0 + REPORT_TTL_S)
    assert sorted(book.reports(now=101.0 + REPORT_TTL_S)) == ["r1"]
    assert book.changes_since(gone) == (later, [], [], True)


def test_replica_counts_and_autoscaling_bounds() -> None:
    import argparse

    from omni_grpc.cluster.deploy import add_cluster_flags, replica_count

    parser = argparse.ArgumentParser()
    add_cluster_flags(parser)
    assert replica_count(parser.parse_args([])) == {"num_replicas": 1}
    assert replica_count(parser.parse_args(["--replicas", "3"])) == {"num_replicas": 3}
    scaled = replica_count(parser.parse_args(["--max-replicas", "4", "--upscale-delay-s", "5"]))["autoscaling_config"]
    assert (scaled["min_replicas"], scaled["max_replicas"], scaled["upscale_delay_s"]) == (1, 4, 5.0)
    for flags, message in (
        (["--replicas", "0"], "at least 1"),
        (["--min-replicas", "2"], "needs --max-replicas"),
        (["--min-replicas", "3", "--max-replicas", "2"], "1 <= --min-replicas <= --max-replicas"),
        (["--replicas", "2", "--max-replicas", "3"], "--replicas is a fixed count"),
    ):
        with pytest.raises(ValueError, match=message):
            replica_count(parser.parse_args(flags))
