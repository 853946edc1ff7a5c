"""omni-grpc: a gRPC text-to-image server with many LoRA adapters, and its offline Python API.

The heavy offline API (torch, diffusers) is imported lazily, so clients that only need the generated
stubs (`from omni_grpc.v1 import omni_pb2, omni_pb2_grpc`) never import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omni_grpc.engine.types import GenerateResult, LoraRequest, SamplingParams
    from omni_grpc.offline import Omni, OmniDiffusionSamplingParams

__all__ = ["GenerateResult", "LoraRequest", "Omni", "OmniDiffusionSamplingParams", "SamplingParams"]

_LAZY = {
    "Omni": "omni_grpc.offline",
    "OmniDiffusionSamplingParams": "omni_grpc.offline",
    "SamplingParams": "omni_grpc.engine.types",
    "LoraRequest": "omni_grpc.engine.types",
    "GenerateResult": "omni_grpc.engine.types",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'omni_grpc' has no attribute {name!r}")
