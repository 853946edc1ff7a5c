"""The project's exceptions.

Each carries the name of the gRPC status it maps to (`code`), as a plain string, so the engine never
imports gRPC: the servicer turns `code` into `grpc.StatusCode[code]` and the gateway into an HTTP status.
That string is the one mapping from error to status.
"""

from __future__ import annotations


class OmniError(Exception):
    """Base class: a request failed in a way the client can be told about."""

    code = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # The request field at fault, for INVALID_ARGUMENT details (e.g. "sampling_params.height").
        self.field = field


class InvalidArgument(OmniError):
    code = "INVALID_ARGUMENT"


class NotFound(OmniError):
    code = "NOT_FOUND"


class AlreadyExists(OmniError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(OmniError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(OmniError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(OmniError):
    code = "UNAVAILABLE"


class Cancelled(OmniError):
    code = "CANCELLED"


class DeadlineExceeded(OmniError):
    code = "DEADLINE_EXCEEDED"


class PermissionDenied(OmniError):
    code = "PERMISSION_DENIED"


class ModelLoadError(OmniError):
    """The base model could not be loaded; fatal at start-up."""

    code = "UNAVAILABLE"
