"""Generation fields shared by the chat and images bodies, in both shapes users send.

- The guide's shape: `lora_request` {path, name, scale, id} and `sampling_params` {height, width, ...}.
- vLLM-Omni's shape: generation fields flat in the body and `lora` {name|lora_name,
  local_path|path|lora_path, scale|lora_scale, int_id|lora_int_id}.
- In either shape, instead of the single adapter: `loras`, a list of adapters composed in one request, each
  with the keys (and spellings) of both shapes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from omni_grpc_gateway.errors import ApiError

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1

Uint32 = Annotated[int, Field(ge=0, le=UINT32_MAX)]
Seed = Annotated[int, Field(ge=0, le=UINT64_MAX)]
AdapterId = Annotated[int, Field(ge=1, le=UINT64_MAX)]
# Finite, and small enough to survive the proto's float32; the server applies the real bounds.
Float32 = Annotated[float, Field(ge=-1e30, le=1e30)]
OutputFormat = Literal["png", "jpeg", "webp"]


class StrictBody(BaseModel):
    """Unknown fields are an error, never silently ignored (a typo would otherwise change the image).

    Text must be valid Unicode: JSON escapes can spell a lone surrogate ("\\ud800"), which Python's JSON
    reader accepts but protobuf cannot encode.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _lone_surrogate_at(data, ())
        if where is not None:
            place = ".".join(where) or None
            # An ApiError, not a ValueError: pydantic would report it at the model, losing the field's path.
            message = f"{place or 'the body'} holds text that is not valid Unicode (a lone surrogate escape)"
            raise ApiError(400, message, param=place)
        return data


def _lone_surrogate_at(value: Any, path: tuple[str, ...]) -> tuple[str, ...] | None:
    """The path of the first string (key or value) that cannot be encoded as UTF-8, if any."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return None
    for key, item in items:
        found = _lone_surrogate_at(key, (*path, "<key>")) or _lone_surrogate_at(item, (*path, str(key)))
        if found is not None:
            return found
    return None


class LoraRequestBody(StrictBody):
    """The guide's `lora_request`: a path on the server (loaded on first use), or a loaded adapter's name or id."""

    path: str | None = Field(None, description="Adapter folder or file on the server machine.")
    name: str | None = Field(None, description="Name of a loaded adapter, or the name to give this path.")
    scale: Float32 | None = Field(None, description="Strength of the adapter (default 1.0).")
    id: AdapterId | None = Field(None, description="Stable adapter id (derived from the path when not given).")
    expert: str | None = Field(
        None, description="Models with several denoisers (Wan 2.2): the one it goes into, e.g. transformer_2."
    )

    @model_validator(mode="after")
    def _names_an_adapter(self) -> LoraRequestBody:
        if not (self.path or self.name or self.id is not None):
            raise ValueError("lora_request needs a path, a name or an id")
        return self


# vLLM-Omni's `lora` keys and the spellings its clients use for them.
_LORA_ALIASES = {
    "name": ("name", "lora_name"),
    "local_path": ("local_path", "path", "lora_path"),
    "scale": ("scale", "lora_scale"),
    "int_id": ("int_id", "lora_int_id"),
}
# A `loras` item's keys: the guide's names, with the spellings of both shapes.
_ITEM_ALIASES = {
    "path": ("path", "local_path", "lora_path"),
    "name": ("name", "lora_name"),
    "scale": ("scale", "lora_scale"),
    "id": ("id", "int_id", "lora_int_id"),
}
# Far above any server's --max-loras-per-request; the server says its own bound.
MAX_LORAS = 64


def _one_spelling_each(data: Any, aliases: dict[str, tuple[str, ...]], what: str) -> Any:
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for key, spellings in aliases.items():
        given = [s for s in spellings if s in data]
        if len(given) > 1:
            raise ValueError(f"{what} has both {' and '.join(given)}; give one")
        if given and given[0] != key:
            data[key] = data.pop(given[0])
    return data


class LoraBody(StrictBody):
    """vLLM-Omni's `lora`. Each key has several accepted spellings; giving two of one key is an error."""

    name: str | None = Field(None, description="Also `lora_name`.")
    local_path: str | None = Field(None, description="Also `path`, `lora_path`: adapter location on the server.")
    scale: Float32 | None = Field(None, description="Also `lora_scale` (default 1.0).")
    int_id: AdapterId | None = Field(None, description="Also `lora_int_id`.")
    expert: str | None = Field(
        None, description="Models with several denoisers (Wan 2.2): the one it goes into, e.g. transformer_2."
    )

    @model_validator(mode="before")
    @classmethod
    def _spellings(cls, data: Any) -> Any:
        return _one_spelling_each(data, _LORA_ALIASES, "lora")

    @model_validator(mode="after")
    def _names_an_adapter(self) -> LoraBody:
        if not (self.local_path or self.name or self.int_id is not None):
            raise ValueError("lora needs local_path (or path, lora_path), name (or lora_name) or int_id")
        return self


class LoraItemBody(StrictBody):
    """One adapter of `loras`: a path on the server, or a loaded adapter's name or id, with its own scale."""

    path: str | None = Field(None, description="Also `local_path`, `lora_path`: adapter location on the server.")
    name: str | None = Field(None, description="Also `lora_name`.")
    scale: Float32 | None = Field(None, description="Also `lora_scale` (default 1.0).")
    id: AdapterId | None = Field(None, description="Also `int_id`, `lora_int_id`.")
    expert: str | None = Field(
        None, description="Models with several denoisers (Wan 2.2): the one it goes into, e.g. transformer_2."
    )

    @model_validator(mode="before")
    @classmethod
    def _spellings(cls, data: Any) -> Any:
        return _one_spelling_each(data, _ITEM_ALIASES, "a loras item")

    @model_validator(mode="after")
    def _names_an_adapter(self) -> LoraItemBody:
        if not (self.path or self.name or self.id is not None):
            raise ValueError("a loras item needs a path (or local_path, lora_path), a name (or lora_name) or an id")
        return self


class SamplingParamsBody(StrictBody):
    """The guide's `sampling_params`. Unset fields take the model's defaults."""

    height: Uint32 | None = None
    width: Uint32 | None = None
    num_inference_steps: Uint32 | None = None
    guidance_scale: Float32 | None = None
    seed: Seed | None = None
    negative_prompt: str | None = None
    num_images: Uint32 | None = Field(None, description="Images for this prompt (default 1).")
    num_frames: Uint32 | None = Field(None, description="Video models: frames per video (Wan: 4k+1).")
    fps: Uint32 | None = Field(None, description="Video models: frames per second of the MP4.")


class GenerationFields(StrictBody):
    """Fields of both generation bodies: the guide's nested shape or vLLM-Omni's flat one, never both."""

    # The guide's shape.
    lora_request: LoraRequestBody | None = None
    sampling_params: SamplingParamsBody | None = None
    # vLLM-Omni's shape.
    lora: LoraBody | None = None
    height: Uint32 | None = None
    width: Uint32 | None = None
    size: str | None = Field(None, description='"WIDTHxHEIGHT", e.g. "1024x1024", or "auto".')
    num_inference_steps: Uint32 | None = None
    guidance_scale: Float32 | None = None
    negative_prompt: str | None = None
    seed: Seed | None = None
    num_outputs_per_prompt: Uint32 | None = None
    num_frames: Uint32 | None = Field(None, description="Video models: frames per video (Wan: 4k+1).")
    fps: Uint32 | None = Field(None, description="Video models: frames per second of the MP4.")
    # Either shape.
    loras: list[LoraItemBody] | None = Field(
        None,
        max_length=MAX_LORAS,
        description="Several adapters composed in one request, each with its own scale (instead of lora_request "
        "or lora).",
    )
    output_format: OutputFormat | None = Field(None, description="Image encoding (default png).")


NESTED_FIELDS = ("lora_request", "sampling_params")
FLAT_FIELDS = (
    "lora",
    "height",
    "width",
    "size",
    "num_inference_steps",
    "guidance_scale",
    "negative_prompt",
    "seed",
    "num_outputs_per_prompt",
    "num_frames",
    "fps",
)
