"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP status mapped
from the gRPC status, for every failure the gateway can meet."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.schemas.errors import ErrorBody, ErrorResponse

log = logging.getLogger(__name__)

HTTP_STATUS_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 422,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# OpenAI's error `type` strings by HTTP status.
_TYPE_OF = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "unprocessable_entity_error",
    429: "rate_limit_error",
    499: "cancelled_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class ApiError(StarletteHTTPException):
    """An error the gateway answers itself, before or after the gRPC call.

    An HTTPException, so that FastAPI lets it through untouched when it is raised while the body is read.
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(status_code=status, detail=message)
        self.param = param
        self.code = code


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorBody(
            message=message,
            type=_TYPE_OF.get(status, "server_error"),
            param=param,
            code=code or _default_code(status),
        )
    )
    return JSONResponse(body.model_dump(), status_code=status)


# The gRPC status name a gateway-made error would have had, so `code` reads the same either way.
_CODE_OF = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    409: "already_exists",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "failed_precondition",
    429: "resource_exhausted",
    499: "cancelled",
    500: "internal",
    501: "unimplemented",
    503: "unavailable",
    504: "deadline_exceeded",
}


def _default_code(status: int) -> str:
    return _CODE_OF.get(status, "error")


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
        status = rpc_status.from_call(error)
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
        if not loc and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            message = "the body must be a JSON object"
        elif param:
            message = f"{param}: {message}"
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, _exc: Exception) -> JSONResponse:
        log.exception("unexpected failure in %s %s", request.method, request.url.path)
        return error_response(500, "internal error; the gateway logged the details")
