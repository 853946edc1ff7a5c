"""Which adapters a request runs with, as Serve's multiplexed model id (no Ray here): requests for the same
adapters get the same id, and so the replica that already holds them."""

from __future__ import annotations

import hashlib
import os

from omni_grpc.v1 import omni_pb2 as pb

PEFT_WEIGHTS = "adapter_model.safetensors"


def adapter_route(request: pb.GenerateRequest) -> str:
    """The request's multiplexed id ("" without adapters: spread by load). A path's file size and modification
    time are part of it, so a changed file is a new id (its old residency no longer attracts requests)."""
    loras = [request.lora_request] if request.HasField("lora_request") else list(request.loras)
    parts = []
    for lora in loras:
        if lora.path:
            parts.append(f"path={lora.path}{_stamp(lora.path)}>{lora.expert}")
        elif lora.name:
            parts.append(f"name={lora.name}>{lora.expert}")
        elif lora.HasField("id"):
            parts.append(f"id={lora.id}>{lora.expert}")
    if not parts:
        return ""
    return hashlib.sha256("|".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _stamp(path: str) -> str:
    file = os.path.join(path, PEFT_WEIGHTS) if os.path.isdir(path) else path
    try:
        stat = os.stat(file)
    except (OSError, ValueError):  # not here (yet): the replica says what is wrong with it
        return ""
    return f"@{stat.st_size}:{stat.st_mtime_ns}"
