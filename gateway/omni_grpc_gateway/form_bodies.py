"""Bodies that come as JSON or as form fields (`curl -F prompt=... -F num_frames=81`, vLLM-Omni's /v1/videos).

A form's fields are the JSON body's top-level keys, each given once; the nested ones (`lora`, `loras`,
`lora_request`, `sampling_params`) are JSON text inside their field. Both end in the same pydantic model and so
in the same checks and the same 400s. Files are refused: no route takes an upload yet.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from omni_grpc_gateway.errors import ApiError

FORM_TYPES = (b"multipart/form-data", b"application/x-www-form-urlencoded")
# Form fields that carry JSON: the nested parts of a generation body.
JSON_FIELDS = frozenset({"lora", "loras", "lora_request", "sampling_params"})
# Far above any body's number of keys.
MAX_FIELDS = 64

Body = TypeVar("Body", bound=BaseModel)


def media_type(request: Request) -> bytes:
    return request.headers.get("content-type", "").split(";")[0].strip().lower().encode("latin-1")


async def json_or_form(request: Request, model: type[Body]) -> Body:
    """The request's body as `model`, from JSON or from form fields; every refusal a 400 naming its field."""
    data: Any
    if media_type(request) in FORM_TYPES:
        data = await _form_fields(request)
    else:
        raw = await request.body()
        try:
            data = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": str(exc)}]) from None
        if data is None:
            raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


async def _form_fields(request: Request) -> dict[str, Any]:
    form = await request.form(max_files=MAX_FIELDS, max_fields=MAX_FIELDS)
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            raise ApiError(400, f"{key}: this route takes no files, only text fields", param=key)
        if key in fields:
            raise ApiError(400, f"{key} is given twice; give each field once", param=key)
        fields[key] = _field_value(key, value)
    return fields


def _field_value(key: str, value: str) -> Any:
    if key not in JSON_FIELDS:
        return value  # pydantic reads numbers from their text
    try:
        return json.loads(value)
    except ValueError as exc:
        raise ApiError(400, f"{key}: a form field holding {key} must be JSON text ({exc})", param=key) from None
