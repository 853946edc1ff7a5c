"""`omni-grpc cluster`: deploy the service on Ray Serve (a local Ray instance, or `--address` to join one) and
keep it up until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from typing import Any, cast

log = logging.getLogger(__name__)
APP_NAME = "omni"
SERVICER = "omni_grpc.v1.omni_pb2_grpc.add_OmniServiceServicer_to_server"
ROUTERS = {
    "affinity": "omni_grpc.cluster.router.AdapterAffinityRouter",
    "power-of-two": "ray.serve._private.request_router.pow_2_router.PowerOfTwoChoicesRequestRouter",
}


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cluster (every other flag is `omni-grpc serve`'s, for each replica)")
    g.add_argument("--address", default=None, help="Ray cluster to join (ray://... or host:port); none: start one")
    g.add_argument("--port", type=int, default=50051, help="Serve's gRPC port (the OmniService endpoint)")
    g.add_argument("--http-port", type=int, default=8000, help="Serve's HTTP proxy port (unused by omni-grpc)")
    g.add_argument("--replicas", type=int, default=1, help="engine replicas (one per GPU)")
    g.add_argument(
        "--gpus-per-replica", type=float, default=None, help="GPUs each replica takes (default: 1 where GPUs exist)"
    )
    g.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica takes")
    g.add_argument("--max-ongoing-requests", type=int, default=16, help="requests a replica takes at once")
    g.add_argument(
        "--max-queued-requests", type=int, default=64, help="requests waiting for a replica; beyond: RESOURCE_EXHAUSTED"
    )
    g.add_argument("--ray-temp-dir", default=None, help="Ray's session files (a local instance only)")
    g.add_argument(
        "--router",
        default="affinity",
        choices=["affinity", "power-of-two"],
        help="adapter affinity (default), or Serve's own power of two choices (for comparison)",
    )


def run(args: argparse.Namespace, serve_args: list[str]) -> int:
    if any(arg.startswith(("--tls-cert", "--tls-key")) for arg in serve_args):
        log.error("Serve's gRPC proxy serves no TLS: terminate TLS in front of it (a load balancer, an ingress)")
        return 2
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, RequestRouterConfig, gRPCOptions

    from omni_grpc.cli import build_parser
    from omni_grpc.cluster.ingress import OmniIngress
    from omni_grpc.cluster.registry import REGISTRY_NAME, AdapterRegistry
    from omni_grpc.cluster.replica import replica_class

    init: dict[str, Any] = {"namespace": "serve", "include_dashboard": False, "log_to_driver": False}
    if args.address:
        init["address"] = args.address
    elif args.ray_temp_dir:
        init["_temp_dir"] = args.ray_temp_dir
    ray.init(**init)
    # Ray's API is partly untyped (and RequestRouterConfig mistyped): called through Any.
    untyped: Any = ray
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if untyped.cluster_resources().get("GPU", 0) else 0.0
    # Held for the app's lifetime: an actor with no handle left is destroyed.
    registry = cast(Any, AdapterRegistry).options(name=REGISTRY_NAME, namespace="serve", get_if_exists=True).remote()
    serve.start(
        grpc_options=gRPCOptions(port=args.port, grpc_servicer_functions=[SERVICER]),
        http_options=HTTPOptions(port=args.http_port),
    )
    deployment: Any = serve.deployment
    device_adapters = build_parser().parse_args(["serve", *serve_args]).max_device_adapters
    replica = deployment(replica_class(device_adapters)).options(
        name="OmniReplica",
        num_replicas=args.replicas,
        ray_actor_options={"num_cpus": args.cpus_per_replica, "num_gpus": gpus},
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        health_check_period_s=2,
        request_router_config=cast(Any, RequestRouterConfig)(request_router_class=ROUTERS[args.router]),
    )
    ingress = deployment(OmniIngress).options(
        name="OmniIngress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000
    )
    serve.run(ingress.bind(replica.bind(serve_args)), name=APP_NAME, blocking=False)
    log.info(
        "cluster ready: OmniService on gRPC port %d, %d replica(s), %g GPU(s) each", args.port, args.replicas, gpus
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    log.info("shutting down the cluster's Serve application")
    cast(Any, serve).shutdown()
    del registry
    untyped.shutdown()
    time.sleep(0.1)
    return 0
