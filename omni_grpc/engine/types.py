"""Plain request and result types of the engine (no gRPC, no protobuf)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omni_grpc.errors import InvalidArgument
from omni_grpc.quoting import shown

if TYPE_CHECKING:
    from PIL import Image as PILImage


class OutputFormat(enum.Enum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"

    @property
    def mime_type(self) -> str:
        return f"image/{self.value}"


class AdapterFormat(enum.Enum):
    PEFT = "peft"
    DIFFUSERS = "diffusers"
    KOHYA = "kohya"
    LYCORIS = "lycoris"
    DIFFUSERS_OLD = "diffusers-old"


@dataclass
class LoraRequest:
    """Which adapter a request runs with: a path (loaded on first use), or a name / id already loaded."""

    path: str | None = None
    name: str | None = None
    id: int | None = None
    scale: float = 1.0
    # The denoiser its denoiser modules go into, on models with several (Wan 2.2's "transformer_2"); None: not
    # given (the first, or with a name or id whichever the adapter was loaded into). The engine makes "" of the first.
    expert: str | None = None

    @classmethod
    def coerce(cls, value: LoraRequest | dict[str, Any] | None) -> LoraRequest | None:
        """Accept the seed's dict form (`{"path": ..., "scale": ...}`) as well as the dataclass."""
        if value is None or isinstance(value, LoraRequest):
            return value
        known = {"path", "name", "id", "scale", "expert"}
        unknown = set(value) - known
        if unknown:
            raise InvalidArgument(f"lora_request has unknown keys {sorted(unknown)}; known: {sorted(known)}")
        scale = value.get("scale")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise InvalidArgument(
                f"lora_request.scale must be a number, got {shown(scale)}", field="lora_request.scale"
            )
        return cls(
            path=value.get("path"),
            name=value.get("name"),
            id=value.get("id"),
            scale=1.0 if scale is None else float(scale),
            expert=value.get("expert") or None,
        )


@dataclass
class SamplingParams:
    """Denoising parameters; None means the model's default."""

    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    num_images: int = 1
    lora_request: LoraRequest | dict[str, Any] | None = None
    # Video models only: frames per video and the MP4's frame rate.
    num_frames: int | None = None
    fps: int | None = None


@dataclass
class GenerateRequest:
    prompt: str
    negative_prompt: str = ""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # One adapter (the seed's lora_request), or several composed (`loras`): one or the other.
    lora: LoraRequest | None = None
    loras: list[LoraRequest] = field(default_factory=list)
    # None: keep PIL images only (offline use); otherwise also encode them.
    output_format: OutputFormat | None = None
    # Video models only: also encode every frame as a PNG.
    return_frames: bool = False


@dataclass
class Timings:
    queue_ms: float = 0.0
    adapter_ms: float = 0.0
    inference_ms: float = 0.0
    encode_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class GeneratedImage:
    image: PILImage.Image
    seed: int
    # The decoded image as floats in [0, 1] (H x W x 3), before rounding to 8 bits.
    array: Any = None
    # The encoded bytes, when the request asked for an output format.
    data: bytes | None = None
    mime_type: str | None = None

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


@dataclass
class GeneratedVideo:
    frames: list[PILImage.Image]
    seed: int
    fps: int
    # The decoded frames as floats in [0, 1] (F x H x W x 3), before rounding to 8 bits.
    array: Any = None
    # The MP4, when the request asked for encoded output; the frames as PNGs when it also set return_frames.
    data: bytes | None = None
    mime_type: str | None = None
    frame_data: list[bytes] = field(default_factory=list)

    @property
    def width(self) -> int:
        return self.frames[0].width

    @property
    def height(self) -> int:
        return self.frames[0].height

    @property
    def num_frames(self) -> int:
        return len(self.frames)


@dataclass
class AppliedAdapter:
    id: int
    name: str
    path: str
    scale: float
    expert: str = ""


@dataclass
class GenerateResult:
    images: list[GeneratedImage]
    # The adapter applied, when exactly one was; every one applied, in request order, in `adapters`.
    adapter: AppliedAdapter | None
    timings: Timings
    num_inference_steps: int
    guidance_scale: float
    # Images in the denoising batch this request ran in (its own included).
    batch_size: int = 1
    # The base model that served it.
    model: str = ""
    adapters: list[AppliedAdapter] = field(default_factory=list)
    # On a video model: the videos (`images` is then empty).
    videos: list[GeneratedVideo] = field(default_factory=list)


@dataclass
class AdapterInfo:
    """A snapshot of one entry of the adapter table."""

    id: int
    name: str
    path: str
    format: AdapterFormat
    rank: int
    alpha: float
    target_modules: list[str]
    pinned: bool
    size_bytes: int
    load_time_ms: float
    use_count: int
    in_use: int
    loads: int
    num_layers: int
    # Where its tensors are: "device", "host" or "disk"; and how it got there.
    tier: str = "device"
    hits: int = 0
    promotions: int = 0
    evictions: int = 0
    # The parts of the model it adapts ("denoiser", "text_encoder", ...).
    components: list[str] = field(default_factory=lambda: ["denoiser"])
    # 1 at the first load; one more each time its files were found changed when read again.
    version: int = 1
    # The denoiser it was loaded into, on models with several; "": the first.
    expert: str = ""


class GuidanceKind(enum.StrEnum):
    # Classifier-free guidance on a doubled batch in one denoiser call; per-sample scales in one batch.
    CFG = "cfg"
    # Guidance distilled into the denoiser as an input (Flux dev); per-sample scales in one batch.
    DISTILLED = "distilled"
    # True classifier-free guidance as a second pass with the negative prompt (Qwen-Image); per-sample scales in
    # one batch.
    TRUE_CFG = "true-cfg"
    # No guidance input at all (Flux schnell): guidance_scale is refused.
    NONE = "none"


class OutputKind(enum.StrEnum):
    IMAGE = "image"
    VIDEO = "video"
