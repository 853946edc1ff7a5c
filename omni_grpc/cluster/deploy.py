"""`omni-grpc cluster`: deploy the service on Ray Serve (a local Ray instance, or `--address` to join one) and
keep it up until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import threading
import time
from typing import Any, cast

from omni_grpc.config import ServerConfig

log = logging.getLogger(__name__)
APP_NAME = "omni"
SERVICER = "omni_grpc.v1.omni_pb2_grpc.add_OmniServiceServicer_to_server"
ROUTERS = {
    "affinity": "omni_grpc.cluster.router.AdapterAffinityRouter",
    "serve": "ray.serve._private.request_router.pow_2_router.PowerOfTwoChoicesRequestRouter",
    "load": "omni_grpc.cluster.router.LoadOnlyRouter",
}
# Run in every worker process of the job, Serve's gRPC proxy included.
SETUP_HOOK = "omni_grpc.cluster.worker_setup.setup"


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cluster (every other flag is `omni-grpc serve`'s, for each replica)")
    g.add_argument("--address", default=None, help="Ray cluster to join (ray://... or host:port); none: start one")
    g.add_argument("--port", type=int, default=ServerConfig.port, help="Serve's gRPC port (the OmniService endpoint)")
    g.add_argument("--http-port", type=int, default=8000, help="Serve's HTTP proxy port (unused by omni-grpc)")
    g.add_argument("--replicas", type=int, default=None, help="engine replicas (one per GPU), without autoscaling (1)")
    g.add_argument("--min-replicas", type=int, default=None, help="autoscaling: the fewest replicas (default 1)")
    g.add_argument("--max-replicas", type=int, default=None, help="autoscaling: the most replicas (turns it on)")
    g.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=2.0,
        help="autoscaling: requests per replica it aims at (a replica batches them)",
    )
    g.add_argument(
        "--upscale-delay-s", type=float, default=30.0, help="autoscaling: how long load must stay high to add one"
    )
    g.add_argument(
        "--downscale-delay-s", type=float, default=600.0, help="autoscaling: how long load must stay low to remove one"
    )
    g.add_argument("--autoscale-window-s", type=float, default=30.0, help="autoscaling: the load's averaging window")
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
        choices=list(ROUTERS),
        help="adapter affinity (default); for comparison, Serve's own router (the power of two choices, preferring "
        "replicas that reported the adapter) or load balancing that ignores adapters",
    )


def replica_count(args: argparse.Namespace) -> dict[str, Any]:
    """The deployment's replica options: a fixed count, or Serve's autoscaling between bounds."""
    if args.max_replicas is None:
        if args.min_replicas is not None:
            raise ValueError("--min-replicas needs --max-replicas (autoscaling)")
        count = 1 if args.replicas is None else args.replicas
        if count < 1:
            raise ValueError("--replicas must be at least 1")
        return {"num_replicas": count}
    if args.replicas is not None:
        raise ValueError("--replicas is a fixed count: with autoscaling, give --min-replicas and --max-replicas")
    low = 1 if args.min_replicas is None else args.min_replicas
    if not 1 <= low <= args.max_replicas:
        raise ValueError("autoscaling needs 1 <= --min-replicas <= --max-replicas")
    return {
        "autoscaling_config": {
            "min_replicas": low,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
            "upscale_delay_s": args.upscale_delay_s,
            "downscale_delay_s": args.downscale_delay_s,
            "look_back_period_s": args.autoscale_window_s,
            "metrics_interval_s": min(10.0, args.autoscale_window_s),
        }
    }


def port_taken(port: int) -> OSError | None:
    """Why `port` cannot be listened on (None: it can), tried as Serve's proxies listen: on every address."""
    with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as sock:
        try:
            sock.bind(("::" if socket.has_ipv6 else "0.0.0.0", port))
        except OSError as exc:
            return exc
    return None


def run(args: argparse.Namespace, serve_args: list[str]) -> int:
    if any(arg.startswith(("--tls-cert", "--tls-key")) for arg in serve_args):
        log.error("Serve's gRPC proxy serves no TLS: terminate TLS in front of it (a load balancer, an ingress)")
        return 2
    try:
        replicas = replica_count(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    for flag, port in (("--port", args.port), ("--http-port", args.http_port)):
        taken = port_taken(port)
        if taken is not None:
            log.error("cannot listen on port %d (%s; is another server using it?): %s", port, flag, taken)
            return 1
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, RequestRouterConfig, gRPCOptions

    from omni_grpc.cli import build_parser
    from omni_grpc.cluster.ingress import OmniIngress
    from omni_grpc.cluster.registry import REGISTRY_NAME, AdapterRegistry
    from omni_grpc.cluster.replica import replica_class

    init: dict[str, Any] = {
        "namespace": "serve",
        "include_dashboard": False,
        "log_to_driver": False,
        "runtime_env": {
            "worker_process_setup_hook": SETUP_HOOK,
            # Serve's proxies share their ports with other processes by default (SO_REUSEPORT): a second
            # cluster on the same port would take half the connections. Binding must fail instead.
            "env_vars": {"SERVE_SOCKET_REUSE_PORT_ENABLED": "0"},
        },
    }
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
        **replicas,
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
    count = replicas.get("num_replicas") or "{min_replicas}-{max_replicas}".format(**replicas["autoscaling_config"])
    log.info("cluster ready: OmniService on gRPC port %d, %s replica(s), %g GPU(s) each", args.port, count, gpus)
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
