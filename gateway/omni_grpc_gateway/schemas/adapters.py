"""The admin routes, with vLLM's names: POST /v1/load_lora_adapter and /v1/unload_lora_adapter."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from omni_grpc_gateway.schemas.common import AdapterId, StrictBody


class LoadLoraAdapterRequest(StrictBody):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1, description="Adapter folder or file on the server machine.")
    lora_int_id: AdapterId | None = None
    pin: bool = Field(False, description="Never evict it and keep it on the device.")
    expert: str | None = Field(None, description="Models with several denoisers (Wan 2.2): the one it goes into.")


class UnloadLoraAdapterRequest(StrictBody):
    lora_name: str | None = None
    lora_int_id: AdapterId | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> UnloadLoraAdapterRequest:
        if (self.lora_name is None) == (self.lora_int_id is None):
            raise ValueError("give exactly one of lora_name and lora_int_id")
        return self


class AdapterOut(BaseModel):
    id: int
    name: str
    path: str
    rank: int
    alpha: float
    pinned: bool
    tier: str
    size_bytes: int
    expert: str = ""


class LoadLoraAdapterResponse(BaseModel):
    adapter: AdapterOut
    # False when the adapter was already loaded (loading is idempotent).
    newly_loaded: bool


class UnloadLoraAdapterResponse(BaseModel):
    adapter: AdapterOut
