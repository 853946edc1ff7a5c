"""The error replies each route documents in the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from omni_grpc_gateway.schemas.errors import ErrorResponse


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


# Every generation route can meet these.
GENERATION_ERRORS = errors(400, 404, 409, 413, 422, 429, 503, 504)
