"""Between the gateway's JSON bodies and the gRPC messages: no HTTP here and no I/O."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

from omni_grpc.v1 import omni_pb2 as pb
from omni_grpc_gateway.errors import ApiError
from omni_grpc_gateway.schemas.chat import ChatMessage
from omni_grpc_gateway.schemas.common import FLAT_FIELDS, NESTED_FIELDS, GenerationFields
from omni_grpc_gateway.schemas.generation import AppliedAdapterOut, GenerationInfo, TimingsOut

_OUTPUT_FORMATS = {
    None: pb.OUTPUT_FORMAT_PNG,
    "png": pb.OUTPUT_FORMAT_PNG,
    "jpeg": pb.OUTPUT_FORMAT_JPEG,
    "webp": pb.OUTPUT_FORMAT_WEBP,
}
# The server's names for the adapter fields -> vLLM-Omni's `lora` keys.
_FLAT_LORA_PARAMS = {
    "lora_request": "lora",
    "lora_request.path": "lora.local_path",
    "lora_request.name": "lora.name",
    "lora_request.scale": "lora.scale",
    "lora_request.id": "lora.int_id",
    "lora_request.expert": "lora.expert",
}
_SIZE = re.compile(r"^\s*(\d{1,9})\s*[xX]\s*(\d{1,9})\s*$")


@dataclass
class Generation:
    """A Generate call, and how the server's field names read in the body the client sent."""

    request: pb.GenerateRequest
    # Server field path -> the same field in this body (used for the `param` of an error).
    params: dict[str, str] = field(default_factory=dict)

    @property
    def has_adapter(self) -> bool:
        return self.request.HasField("lora_request") or len(self.request.loras) > 0


def prompt_from_messages(messages: list[ChatMessage]) -> str:
    """The text of the last user message; text parts are joined with a space."""
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message.role != "user":
            continue
        if isinstance(message.content, str):
            return message.content
        texts = []
        for part_index, part in enumerate(message.content or []):
            if part.type != "text" or part.text is None:
                raise ApiError(
                    400,
                    f"messages[{index}].content[{part_index}] is a {part.type!r} part; only text parts make a prompt",
                    param=f"messages.{index}.content.{part_index}",
                )
            texts.append(part.text)
        return " ".join(texts)
    raise ApiError(400, "messages has no user message to take the prompt from", param="messages")


def generation_request(
    body: GenerationFields,
    *,
    prompt: str,
    prompt_param: str,
    count: int | None = None,
    count_param: str | None = None,
) -> Generation:
    """Build the Generate call from either body shape; a body that mixes the two is refused."""
    given = body.model_fields_set
    nested = [name for name in NESTED_FIELDS if name in given and getattr(body, name) is not None]
    flat = [name for name in FLAT_FIELDS if name in given and getattr(body, name) is not None]
    if nested and flat:
        raise ApiError(
            400,
            f"the body mixes the nested shape ({', '.join(nested)}) with the flat shape ({', '.join(flat)}); "
            "use one: lora_request + sampling_params, or lora + flat fields",
            param=flat[0],
        )
    single = next((name for name in ("lora_request", "lora") if getattr(body, name) is not None), None)
    if body.loras is not None and single is not None:
        raise ApiError(
            400, f"give loras or {single}, not both ({single} is the same as a one-element loras)", param="loras"
        )
    request = pb.GenerateRequest(prompt=prompt, output_format=_OUTPUT_FORMATS[body.output_format])
    params = {"prompt": prompt_param, "loras": "loras"}
    for index, item in enumerate(body.loras or []):
        lora = request.loras.add()
        _set_lora(lora, path=item.path, name=item.name, scale=item.scale, adapter_id=item.id, expert=item.expert)
        params[f"loras[{index}]"] = f"loras.{index}"
        keys = ("path", "name", "scale", "id", "expert")
        params.update({f"loras[{index}].{key}": f"loras.{index}.{key}" for key in keys})
    if nested:
        _fill_nested(body, request)
        params["negative_prompt"] = "sampling_params.negative_prompt"
        shape_count = "sampling_params.num_images"
    else:
        _fill_flat(body, request, params)
        shape_count = "num_outputs_per_prompt"
    params["sampling_params.num_images"] = shape_count
    if count is not None:
        if request.sampling_params.HasField("num_images"):
            raise ApiError(
                400,
                f"{count_param} and {shape_count} both set the number of images; give one",
                param=count_param,
            )
        request.sampling_params.num_images = count
        params["sampling_params.num_images"] = count_param or shape_count
    return Generation(request=request, params=params)


def _fill_nested(body: GenerationFields, request: pb.GenerateRequest) -> None:
    if body.lora_request is not None:
        lr = body.lora_request
        _set_lora(request.lora_request, path=lr.path, name=lr.name, scale=lr.scale, adapter_id=lr.id, expert=lr.expert)
    if body.sampling_params is not None:
        sp = body.sampling_params
        if sp.negative_prompt is not None:
            request.negative_prompt = sp.negative_prompt
        _set_sampling(
            request.sampling_params,
            height=sp.height,
            width=sp.width,
            num_inference_steps=sp.num_inference_steps,
            guidance_scale=sp.guidance_scale,
            seed=sp.seed,
            num_images=sp.num_images,
            num_frames=sp.num_frames,
            fps=sp.fps,
        )


def _fill_flat(body: GenerationFields, request: pb.GenerateRequest, params: dict[str, str]) -> None:
    if body.lora is not None:
        lora = body.lora
        _set_lora(
            request.lora_request,
            path=lora.local_path,
            name=lora.name,
            scale=lora.scale,
            adapter_id=lora.int_id,
            expert=lora.expert,
        )
        params.update(_FLAT_LORA_PARAMS)
    height, width = body.height, body.width
    if body.size is not None:
        if height is not None or width is not None:
            raise ApiError(400, "give either size or height/width, not both", param="size")
        width, height = parse_size(body.size)
    if body.negative_prompt is not None:
        request.negative_prompt = body.negative_prompt
    _set_sampling(
        request.sampling_params,
        height=height,
        width=width,
        num_inference_steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
        seed=body.seed,
        num_images=body.num_outputs_per_prompt,
        num_frames=body.num_frames,
        fps=body.fps,
    )
    for name in ("height", "width", "num_inference_steps", "guidance_scale", "seed", "num_frames", "fps"):
        params[f"sampling_params.{name}"] = "size" if body.size is not None and name in ("height", "width") else name
    params["negative_prompt"] = "negative_prompt"


def parse_size(size: str) -> tuple[int | None, int | None]:
    """ "WIDTHxHEIGHT" -> (width, height); "auto" -> the model's defaults."""
    if size.strip().lower() == "auto":
        return None, None
    match = _SIZE.match(size)
    if match is None:
        raise ApiError(400, f'size must look like "1024x1024" (width x height), got {size!r}', param="size")
    width, height = int(match.group(1)), int(match.group(2))
    return width, height


def _set_lora(
    lr: pb.LoraRequest,
    *,
    path: str | None,
    name: str | None,
    scale: float | None,
    adapter_id: int | None,
    expert: str | None = None,
) -> None:
    lr.SetInParent()
    if expert:
        lr.expert = expert
    if path:
        lr.path = path
    if name:
        lr.name = name
    if scale is not None:
        lr.scale = scale
    if adapter_id is not None:
        lr.id = adapter_id


def _set_sampling(sp: pb.SamplingParams, **values: int | float | None) -> None:
    for name, value in values.items():
        if value is not None:
            setattr(sp, name, value)


def select_adapter_by_model(generation: Generation, adapter_name: str) -> None:
    """Run with the adapter the `model` field named (vLLM's convention for adapters listed as models)."""
    generation.request.lora_request.name = adapter_name
    generation.params["lora_request.name"] = "model"


def data_url(image: pb.Image) -> str:
    return f"data:{image.mime_type};base64,{b64(image)}"


def b64(image: pb.Image) -> str:
    return base64.b64encode(image.data).decode("ascii")


def generation_info(response: pb.GenerateResponse) -> GenerationInfo:
    adapters = [
        AppliedAdapterOut(id=a.id, name=a.name, path=a.path, scale=a.scale, expert=a.expert) for a in response.adapters
    ]
    t = response.timings
    return GenerationInfo(
        seeds=[image.seed for image in response.images],
        adapter=adapters[0] if response.HasField("adapter") and adapters else None,
        adapters=adapters,
        num_inference_steps=response.num_inference_steps,
        guidance_scale=response.guidance_scale,
        batch_size=response.batch_size,
        timings=TimingsOut(
            queue_ms=t.queue_ms,
            adapter_ms=t.adapter_ms,
            inference_ms=t.inference_ms,
            encode_ms=t.encode_ms,
            total_ms=t.total_ms,
        ),
    )
