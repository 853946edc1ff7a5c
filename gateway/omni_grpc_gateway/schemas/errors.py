"""The OpenAI error object."""

from __future__ import annotations

from pydantic import BaseModel


class ErrorBody(BaseModel):
    message: str
    # OpenAI's kind of error, e.g. "invalid_request_error", "not_found_error".
    type: str
    # The request field at fault, when one is.
    param: str | None = None
    # The gRPC status name in lower case ("invalid_argument"), or a gateway code ("invalid_json").
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
