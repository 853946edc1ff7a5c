"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP status mapped
from the gRPC status, for every failure the gateway can meet."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from starlette.exceptions import HTTPException as StarletteHTTPException

from omni_grpc_gateway.log_values import loggable
from omni_grpc_gateway.schemas.errors import ErrorBody, ErrorResponse

log = logging.getLogger(__name__)

# The one mapping: gRPC status -> HTTP status, OpenAI's error `type`, and the `code` the body carries (the
# gRPC status name in lower case). Rows without a gRPC status are errors the gateway makes itself. The
# first row of an HTTP status gives the type and code of a gateway-made error with that status.
_STATUS_TABLE: tuple[tuple[grpc.StatusCode | None, int, str, str], ...] = (
    (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error", "invalid_argument"),
    (grpc.StatusCode.OUT_OF_RANGE, 400, "invalid_request_error", "out_of_range"),
    (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error", "unauthenticated"),
    (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error", "permission_denied"),
    (grpc.StatusCode.NOT_FOUND, 404, "not_found_error", "not_found"),
    (None, 405, "invalid_request_error", "method_not_allowed"),
    (None, 408, "invalid_request_error", "request_timeout"),
    (grpc.StatusCode.ALREADY_EXISTS, 409, "conflict_error", "already_exists"),
    (grpc.StatusCode.ABORTED, 409, "conflict_error", "aborted"),
    (None, 413, "invalid_request_error", "request_too_large"),
    (None, 415, "invalid_request_error", "unsupported_media_type"),
    (grpc.StatusCode.FAILED_PRECONDITION, 422, "unprocessable_entity_error", "failed_precondition"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error", "resource_exhausted"),
    (grpc.StatusCode.CANCELLED, 499, "cancelled_error", "cancelled"),
    (None, 500, "server_error", "internal"),
    (grpc.StatusCode.UNIMPLEMENTED, 501, "not_implemented_error", "unimplemented"),
    (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable_error", "unavailable"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error", "deadline_exceeded"),
)
HTTP_STATUS_OF = {code: http for code, http, _, _ in _STATUS_TABLE if code is not None}
_TYPE_AND_CODE_OF: dict[int, tuple[str, str]] = {}
for _, _http, _type, _code in _STATUS_TABLE:
    _TYPE_AND_CODE_OF.setdefault(_http, (_type, _code))


class ApiError(StarletteHTTPException):
    """An error the gateway answers itself, before or after the gRPC call.

    An HTTPException, so that FastAPI lets it through untouched when it is raised while the body is read.
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(status_code=status, detail=message)
        self.param = param
        self.code = code


def _error(status: int, message: str, param: str | None, code: str | None) -> ErrorResponse:
    error_type, default_code = _TYPE_AND_CODE_OF.get(status, ("server_error", "error"))
    return ErrorResponse(error=ErrorBody(message=message, type=error_type, param=param, code=code or default_code))


def error_object(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The error object as a dict, for an error sent inside a stream."""
    return _error(status, message, param, code).model_dump()


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(_error(status, message, param, code).model_dump(), status_code=status)


def error_body(status: int, message: str, *, code: str | None = None) -> bytes:
    """The same object as bytes, for answers written below the app (by the HTTP protocol itself)."""
    return _error(status, message, None, code).model_dump_json().encode()


def from_rpc_error(error: grpc.aio.AioRpcError, params: Mapping[str, str] | None = None) -> ApiError:
    """Map a failed gRPC call to an ApiError; `params` renames the server's field paths to this body's."""
    code = error.code()
    status = HTTP_STATUS_OF.get(code, 500)
    message = error.details() or code.name.lower()
    if code == grpc.StatusCode.UNAVAILABLE:
        # Connection failures carry transport jargon ("failed to connect to all addresses"): say who failed.
        message = f"the gRPC server is unavailable: {message}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = "the request took longer than the gateway's --request-timeout"
    field = _violated_field(error)
    if field is not None and params:
        field = params.get(field, field)
    return ApiError(status, message, param=field, code=code.name.lower())


def _violated_field(error: grpc.aio.AioRpcError) -> str | None:
    try:
        # An AioRpcError has all that from_call reads (code, details, trailing metadata).
        status = rpc_status.from_call(cast(grpc.Call, error))
    except ValueError:  # a status whose details do not match its code: keep the message only
        return None
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad) and bad.field_violations:
            return bad.field_violations[0].field
    return None


def install_error_handlers(app: FastAPI) -> None:
    """Every failure leaves as an OpenAI error object; nothing escapes as a bare 500 page."""

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.detail, param=exc.param, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json")
        param = ".".join(loc) or None
        # pydantic prefixes a validator's own message with "Value error, "; the reader needs only the reason.
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if not loc and first.get("type") == "missing":
            message = "the body is empty; it must be a JSON object"
        elif not loc and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            message = "the body must be a JSON object"
        elif param:
            message = f"{param}: {message}"
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code in (404, 405):  # from the router: say which route was asked for
            route = f"{request.method} {request.url.path}"[:300]
            what = "no such route" if exc.status_code == 404 else "this route does not take that method"
            hint = " (without the trailing slash?)" if request.url.path.endswith("/") and exc.status_code == 404 else ""
            return error_response(exc.status_code, f"{what}: {route}{hint}")
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, _exc: Exception) -> JSONResponse:
        log.exception("unexpected failure in %s %s", loggable(request.method), loggable(request.url.path))
        return error_response(500, "internal error; the gateway logged the details")
