from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FORMAT_UNSPECIFIED: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_PNG: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_JPEG: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_WEBP: _ClassVar[OutputFormat]

class AdapterFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_FORMAT_UNSPECIFIED: _ClassVar[AdapterFormat]
    ADAPTER_FORMAT_PEFT: _ClassVar[AdapterFormat]
    ADAPTER_FORMAT_DIFFUSERS: _ClassVar[AdapterFormat]

class AdapterTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_TIER_UNSPECIFIED: _ClassVar[AdapterTier]
    ADAPTER_TIER_DEVICE: _ClassVar[AdapterTier]
    ADAPTER_TIER_HOST: _ClassVar[AdapterTier]
    ADAPTER_TIER_DISK: _ClassVar[AdapterTier]
OUTPUT_FORMAT_UNSPECIFIED: OutputFormat
OUTPUT_FORMAT_PNG: OutputFormat
OUTPUT_FORMAT_JPEG: OutputFormat
OUTPUT_FORMAT_WEBP: OutputFormat
ADAPTER_FORMAT_UNSPECIFIED: AdapterFormat
ADAPTER_FORMAT_PEFT: AdapterFormat
ADAPTER_FORMAT_DIFFUSERS: AdapterFormat
ADAPTER_TIER_UNSPECIFIED: AdapterTier
ADAPTER_TIER_DEVICE: AdapterTier
ADAPTER_TIER_HOST: AdapterTier
ADAPTER_TIER_DISK: AdapterTier

class SamplingParams(_message.Message):
    __slots__ = ("height", "width", "num_inference_steps", "guidance_scale", "seed", "num_images")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    num_images: int
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., num_images: _Optional[int] = ...) -> None: ...

class LoraRequest(_message.Message):
    __slots__ = ("path", "name", "id", "scale")
    PATH_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    path: str
    name: str
    id: int
    scale: float
    def __init__(self, path: _Optional[str] = ..., name: _Optional[str] = ..., id: _Optional[int] = ..., scale: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "sampling_params", "lora_request", "output_format")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    LORA_REQUEST_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    sampling_params: SamplingParams
    lora_request: LoraRequest
    output_format: OutputFormat
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., sampling_params: _Optional[_Union[SamplingParams, _Mapping]] = ..., lora_request: _Optional[_Union[LoraRequest, _Mapping]] = ..., output_format: _Optional[_Union[OutputFormat, str]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("data", "mime_type", "width", "height", "seed")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    mime_type: str
    width: int
    height: int
    seed: int
    def __init__(self, data: _Optional[bytes] = ..., mime_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "adapter_ms", "inference_ms", "encode_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    adapter_ms: float
    inference_ms: float
    encode_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., adapter_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class AppliedAdapter(_message.Message):
    __slots__ = ("id", "name", "path", "scale")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    path: str
    scale: float
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., path: _Optional[str] = ..., scale: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("images", "adapter", "timings", "num_inference_steps", "guidance_scale", "batch_size", "model")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    adapter: AppliedAdapter
    timings: Timings
    num_inference_steps: int
    guidance_scale: float
    batch_size: int
    model: str
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., adapter: _Optional[_Union[AppliedAdapter, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., batch_size: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("id", "name", "path", "rank", "alpha", "target_modules", "pinned", "size_bytes", "load_time_ms", "use_count", "in_use", "loads", "format", "num_layers", "tier", "hits", "promotions", "evictions")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    USE_COUNT_FIELD_NUMBER: _ClassVar[int]
    IN_USE_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    path: str
    rank: int
    alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    pinned: bool
    size_bytes: int
    load_time_ms: float
    use_count: int
    in_use: int
    loads: int
    format: AdapterFormat
    num_layers: int
    tier: AdapterTier
    hits: int
    promotions: int
    evictions: int
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., path: _Optional[str] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., pinned: _Optional[bool] = ..., size_bytes: _Optional[int] = ..., load_time_ms: _Optional[float] = ..., use_count: _Optional[int] = ..., in_use: _Optional[int] = ..., loads: _Optional[int] = ..., format: _Optional[_Union[AdapterFormat, str]] = ..., num_layers: _Optional[int] = ..., tier: _Optional[_Union[AdapterTier, str]] = ..., hits: _Optional[int] = ..., promotions: _Optional[int] = ..., evictions: _Optional[int] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("path", "name", "id", "pin")
    PATH_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    path: str
    name: str
    id: int
    pin: bool
    def __init__(self, path: _Optional[str] = ..., name: _Optional[str] = ..., id: _Optional[int] = ..., pin: _Optional[bool] = ...) -> None: ...

class LoadAdapterResponse(_message.Message):
    __slots__ = ("adapter", "newly_loaded")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    NEWLY_LOADED_FIELD_NUMBER: _ClassVar[int]
    adapter: Adapter
    newly_loaded: bool
    def __init__(self, adapter: _Optional[_Union[Adapter, _Mapping]] = ..., newly_loaded: _Optional[bool] = ...) -> None: ...

class UnloadAdapterRequest(_message.Message):
    __slots__ = ("id", "name", "path")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    path: str
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class UnloadAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: Adapter
    def __init__(self, adapter: _Optional[_Union[Adapter, _Mapping]] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "max_loaded_adapters", "max_device_adapters", "max_host_adapters")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_LOADED_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_DEVICE_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_HOST_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[Adapter]
    max_loaded_adapters: int
    max_device_adapters: int
    max_host_adapters: int
    def __init__(self, adapters: _Optional[_Iterable[_Union[Adapter, _Mapping]]] = ..., max_loaded_adapters: _Optional[int] = ..., max_device_adapters: _Optional[int] = ..., max_host_adapters: _Optional[int] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("model", "family", "default_height", "default_width", "default_num_inference_steps", "default_guidance_scale", "spatial_multiple", "started_at", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SPATIAL_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    family: str
    default_height: int
    default_width: int
    default_num_inference_steps: int
    default_guidance_scale: float
    spatial_multiple: int
    started_at: int
    version: str
    def __init__(self, model: _Optional[str] = ..., family: _Optional[str] = ..., default_height: _Optional[int] = ..., default_width: _Optional[int] = ..., default_num_inference_steps: _Optional[int] = ..., default_guidance_scale: _Optional[float] = ..., spatial_multiple: _Optional[int] = ..., started_at: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...
