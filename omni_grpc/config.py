"""Configuration objects, filled from CLI flags or by Python callers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Limits:
    """Bounds on one request; anything beyond is INVALID_ARGUMENT naming the limit."""

    max_steps: int = 1000
    max_side: int = 4096
    max_pixels: int = 2048 * 2048
    max_images: int = 8
    # steps x images x height x width / 2^20 ("megapixel-steps"): the work one request may ask for. The default
    # admits 8 images of 1024x1024 at 50 steps and refuses, say, 1536x1536 at 1000 steps.
    max_request_work: int = 400
    max_prompt_chars: int = 10_000
    max_lora_scale: float = 10.0
    # Adapters one request may compose (GenerateRequest.loras).
    max_loras_per_request: int = 4
    max_guidance_scale: float = 100.0
    # Largest LoRA rank an adapter file may declare (checked from its header, before reading the tensors).
    max_lora_rank: int = 256


@dataclass
class EngineConfig:
    # A local diffusers folder or a hub id; None: the embedded small default model.
    model: str | None = None
    # The model's name for clients (GetServerInfo, replies, /v1/models); default: the hub id or the folder's name.
    served_model_name: str | None = None
    device: str | None = None
    dtype: str = "auto"
    # Pre-loaded, pinned adapters: "PATH" or "NAME=PATH". The operator's choice: allowed wherever they are.
    lora_paths: list[str] = field(default_factory=list)
    # Folders clients may load adapters from by path (per request or LoadAdapter); none: no path loads.
    lora_dirs: list[str] = field(default_factory=list)
    # Trusted single-user setups (and offline use): any path the process can read.
    allow_any_lora_path: bool = False
    # Bound on adapters in the table, in any tier (0: unbounded); the LRU unpinned, unused one is evicted.
    max_loaded_adapters: int = 1024
    # Adapters of the operator and of LoadAdapter are never evicted for a request's load by path (the server
    # sets this when admin calls need a token: then only admins decide what stays).
    reserve_admin_adapters: bool = False
    # Adapters whose tensors stay on the device (0: unbounded), then in host memory; beyond, on disk only.
    max_device_adapters: int = 64
    max_host_adapters: int = 256
    # Bytes that adapter loads in progress may hold at once; a load beyond waits for room, then is refused.
    max_loading_bytes: int = 2 << 30
    # Most images in one denoising batch (requests of one shape share it; 1 turns batching off).
    max_batch_size: int = 8
    # How many of them a batch takes: "learned" (the most images per second, from what batches of each size
    # cost this server; see engine/batch_sizer.py) or "fill" (as many as are queued).
    batch_policy: str = "learned"
    # Batches in flight at once, taking turns on the model step by step: a batch much shorter than the
    # running ones starts beside them instead of waiting for them to end (1: strictly one after another).
    max_running_batches: int = 4
    # Most Generate requests waiting for the worker; beyond, RESOURCE_EXHAUSTED at once (0: unbounded).
    max_queue: int = 64
    limits: Limits = field(default_factory=Limits)
    cache_dir: Path | None = None
    # CPU threads torch may use (None: torch's default, one per core). Lower it where other processes
    # share the cores: oversubscribed threads slow every step many times over.
    torch_threads: int | None = None
    # Show diffusers' progress bar (offline use); the server keeps it off.
    progress_bar: bool = False


@dataclass
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 50051
    # Seconds running requests get to finish after SIGTERM/SIGINT.
    grace_period: float = 30.0
    # Largest gRPC message, both ways (images of a big batch can exceed gRPC's 4 MiB default).
    max_message_bytes: int = 64 * 1024 * 1024
    # Largest request message; beyond, INVALID_ARGUMENT naming the limit (gRPC itself refuses 4x this).
    max_request_bytes: int = 1024 * 1024
    # Admin RPCs (LoadAdapter, UnloadAdapter) need "authorization: Bearer <token>" when set.
    admin_token: str | None = None
    # TLS for the gRPC port when both are set (PEM files).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Prometheus metrics over HTTP on this port, on the same host (0: none).
    metrics_port: int = 9464
