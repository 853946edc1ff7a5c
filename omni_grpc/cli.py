"""The `omni-grpc` command: `omni-grpc serve|gateway|bench|soak ...`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from omni_grpc.config import EngineConfig, Limits, ServerConfig
from omni_grpc.shared.logs import add_logging_flags, add_version_flag, configure_logging

ADMIN_TOKEN_ENV = "OMNI_GRPC_ADMIN_TOKEN"


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the server and the offline example; their defaults are the config's own."""
    engine = EngineConfig()
    g = parser.add_argument_group("model and adapters")
    g.add_argument(
        "--model",
        default=None,
        help="local diffusers pipeline folder or hub id (default: the embedded small SD3 model, random weights)",
    )
    g.add_argument(
        "--served-model-name",
        default=None,
        help="the model's name for clients (default: the hub id, or the folder's name; never its path)",
    )
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default=engine.dtype, choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument(
        "--lora-path",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="adapter to pre-load and pin at start (repeatable); its id is derived from the path",
    )
    g.add_argument(
        "--lora-dirs",
        action="append",
        default=[],
        metavar="DIR",
        help="folder clients may load adapters from by path, symlinks followed (repeatable); without it, "
        "requests can use pre-loaded adapters only",
    )
    g.add_argument(
        "--allow-any-lora-path",
        action="store_true",
        help="trusted single-user setups only: clients may load adapters from any path the server can read",
    )
    g.add_argument(
        "--max-loaded-adapters",
        type=int,
        default=engine.max_loaded_adapters,
        help="adapters in the table, any tier; the least recently used unpinned, unused one is evicted (0: no bound)",
    )
    g.add_argument(
        "--max-device-adapters",
        type=int,
        default=engine.max_device_adapters,
        help="adapters whose tensors stay on the device (0: no bound); the least recently used move to host",
    )
    g.add_argument(
        "--max-host-adapters",
        type=int,
        default=engine.max_host_adapters,
        help="adapters kept in host memory; beyond, the least recently used are dropped and re-read from disk",
    )
    g.add_argument(
        "--max-batch-size",
        type=int,
        default=engine.max_batch_size,
        help="most images in one denoising batch; concurrent requests of one shape share it (1: off)",
    )
    g.add_argument(
        "--batch-policy",
        choices=("learned", "fill"),
        default=engine.batch_policy,
        help="how many queued images a batch takes: 'learned' gives the most images per second from what batches "
        "of each size cost this server (smaller batches where batching does not pay); 'fill' takes all that fit",
    )
    g.add_argument(
        "--max-running-batches",
        type=int,
        default=engine.max_running_batches,
        help="batches in flight at once, taking turns step by step: a much shorter batch starts beside long ones "
        "instead of waiting (1: one after another)",
    )
    g.add_argument(
        "--max-loading-bytes",
        type=int,
        default=engine.max_loading_bytes,
        help="memory that adapter loads in progress may hold at once; beyond, a load waits, then RESOURCE_EXHAUSTED",
    )
    g.add_argument("--cache-dir", type=Path, default=None, help="where the embedded default model is cached")
    g.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="CPU threads torch may use (default: one per core); lower it when other processes share the cores",
    )
    lim = parser.add_argument_group("request limits")
    defaults = Limits()
    lim.add_argument("--max-steps", type=int, default=defaults.max_steps)
    lim.add_argument("--max-side", type=int, default=defaults.max_side, help="largest height or width")
    lim.add_argument("--max-pixels", type=int, default=defaults.max_pixels, help="largest height x width")
    lim.add_argument("--max-images", type=int, default=defaults.max_images, help="most images per request")
    lim.add_argument("--max-prompt-chars", type=int, default=defaults.max_prompt_chars)
    lim.add_argument(
        "--max-request-work",
        type=int,
        default=defaults.max_request_work,
        help="most megapixel-steps (steps x images x height x width / 2^20) one request may ask for",
    )
    lim.add_argument(
        "--max-lora-rank", type=int, default=defaults.max_lora_rank, help="largest rank an adapter may declare"
    )
    lim.add_argument(
        "--max-loras-per-request",
        type=int,
        default=defaults.max_loras_per_request,
        help="most adapters one request may compose (GenerateRequest.loras)",
    )
    lim.add_argument(
        "--max-queue",
        type=int,
        default=engine.max_queue,
        help="most requests waiting for the model; beyond, RESOURCE_EXHAUSTED at once (0: unbounded)",
    )


def engine_config_from_args(args: argparse.Namespace, *, progress_bar: bool = False) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        device=args.device,
        dtype=args.dtype,
        lora_paths=list(args.lora_path),
        lora_dirs=list(args.lora_dirs),
        allow_any_lora_path=args.allow_any_lora_path,
        max_queue=args.max_queue,
        max_loaded_adapters=args.max_loaded_adapters,
        max_device_adapters=args.max_device_adapters,
        max_host_adapters=args.max_host_adapters,
        max_loading_bytes=args.max_loading_bytes,
        max_batch_size=args.max_batch_size,
        batch_policy=args.batch_policy,
        max_running_batches=args.max_running_batches,
        cache_dir=args.cache_dir,
        torch_threads=args.torch_threads,
        progress_bar=progress_bar,
        limits=Limits(
            max_steps=args.max_steps,
            max_side=args.max_side,
            max_pixels=args.max_pixels,
            max_images=args.max_images,
            max_prompt_chars=args.max_prompt_chars,
            max_request_work=args.max_request_work,
            max_lora_rank=args.max_lora_rank,
            max_loras_per_request=args.max_loras_per_request,
        ),
    )


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """`omni-grpc serve` flags as the server's configuration."""
    return ServerConfig(
        engine=engine_config_from_args(args),
        host=args.host,
        port=args.port,
        grace_period=args.grace_period,
        max_request_bytes=args.max_request_bytes,
        admin_token=args.admin_token or None,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        metrics_port=args.metrics_port,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni-grpc", description="gRPC text-to-image server with many LoRA adapters")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server")
    add_engine_flags(serve)
    server = ServerConfig()
    net = serve.add_argument_group("server")
    net.add_argument("--host", default=server.host, help="address to bind (0.0.0.0 for all interfaces)")
    net.add_argument("--port", type=int, default=server.port, help="port (0: pick a free one and log it)")
    net.add_argument(
        "--grace-period", type=float, default=server.grace_period, help="seconds running requests get on shutdown"
    )
    net.add_argument("--max-request-bytes", type=int, default=server.max_request_bytes, help="largest request message")
    net.add_argument(
        "--metrics-port",
        type=int,
        default=server.metrics_port,
        help="Prometheus metrics at http://HOST:PORT/metrics (0: off)",
    )
    sec = serve.add_argument_group("security")
    sec.add_argument(
        "--admin-token",
        default=os.environ.get(ADMIN_TOKEN_ENV),
        help=f"LoadAdapter/UnloadAdapter need 'authorization: Bearer TOKEN' (default: ${ADMIN_TOKEN_ENV})",
    )
    sec.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain: serve TLS (with --tls-key)")
    sec.add_argument("--tls-key", type=Path, default=None, help="PEM private key for --tls-cert")
    add_logging_flags(net)
    serve.add_argument(
        "--example-adapter",
        type=Path,
        default=None,
        help="on the embedded default model, write a PEFT adapter that fits it at this path first, unless the path "
        "exists (scripts/serve.sh: ./loras/lora_adapter)",
    )
    gateway = sub.add_parser("gateway", help="run the REST gateway (OpenAI-style JSON) in front of a gRPC server")
    from omni_grpc_gateway.cli import add_gateway_flags

    add_gateway_flags(gateway)
    cluster = sub.add_parser(
        "cluster", help="run the service on Ray Serve: replicas of the engine behind one gRPC endpoint (extra: cluster)"
    )
    from omni_grpc.cluster.deploy import add_cluster_flags

    add_cluster_flags(cluster)
    add_logging_flags(cluster)
    bench = sub.add_parser("bench", help="measure throughput and adapter costs against plain diffusers")
    from omni_grpc.bench.run import add_flags

    add_flags(bench)
    add_logging_flags(bench, level="WARNING")
    soak = sub.add_parser("soak", help="load/generate/unload cycles against a real server on loopback")
    from omni_grpc.bench.soak import add_flags as add_soak_flags

    add_soak_flags(soak)
    add_logging_flags(soak, level="WARNING")
    example = sub.add_parser(
        "example-adapter", help="write a PEFT adapter that fits the embedded default model (never overwrites)"
    )
    example.add_argument("path", type=Path, nargs="?", default=Path("loras/lora_adapter"))
    example.add_argument("--cache-dir", type=Path, default=None, help="where the embedded default model is cached")
    add_logging_flags(example, level="WARNING")
    for command in (parser, serve, gateway, cluster, bench, soak, example):
        add_version_flag(command, "omni-grpc")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "cluster":
        # The rest are `serve` flags, for every replica: checked here, once.
        parser.parse_args(["serve", *extra])
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    configure_logging(args.log_level, args.log_format)
    if args.command == "serve":
        from omni_grpc.service.server import serve

        config = server_config_from_args(args)
        if (config.tls_cert is None) != (config.tls_key is None):
            print("omni-grpc serve: --tls-cert and --tls-key go together", file=sys.stderr)
            return 2
        if args.example_adapter is not None and args.model is None:
            from omni_grpc.tiny_models.example_adapter import write_example_adapter

            try:
                if write_example_adapter(args.example_adapter, args.cache_dir):
                    logging.getLogger(__name__).info("wrote the example adapter to %s", args.example_adapter)
            except OSError as exc:  # a convenience: never a reason not to serve
                logging.getLogger(__name__).warning("could not write the example adapter: %s", exc)
        return asyncio.run(serve(config))
    if args.command == "gateway":
        from omni_grpc_gateway.cli import run as run_gateway

        return run_gateway(args)
    if args.command == "cluster":
        from omni_grpc.cluster.deploy import run as run_cluster

        return run_cluster(args, extra)
    if args.command == "bench":
        from omni_grpc.bench.run import run

        return run(args)
    if args.command == "soak":
        from omni_grpc.bench.soak import run as run_soak

        return run_soak(args)
    if args.command == "example-adapter":
        from omni_grpc.tiny_models.example_adapter import write_example_adapter

        written = write_example_adapter(args.path, args.cache_dir)
        print(f"{'wrote the example adapter to' if written else 'left alone what is at'} {args.path}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
