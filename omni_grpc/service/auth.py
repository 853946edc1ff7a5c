"""The admin token: LoadAdapter and UnloadAdapter need it when the server is given one, and only callers
that send it see the server's own paths (in ListAdapters).

The admin RPCs are refused by a gRPC server interceptor, before the request is even deserialised, so the
servicer stays a plain converter; the servicer asks the same `AdminToken` whether a caller is an admin.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

log = logging.getLogger(__name__)

# gRPC call metadata, as interceptors and servicer contexts give it: (key, value) pairs.
Metadata = Iterable[tuple[str, str | bytes]]
# The RPCs of OmniService that need the admin token (when one is set).
ADMIN_METHODS = ("LoadAdapter", "UnloadAdapter")


class AdminToken:
    """The bearer token of admin calls; None: no token is configured, and every caller is an admin."""

    def __init__(self, token: str | None) -> None:
        # Compared in constant time; the token itself is never logged.
        self._expected = f"Bearer {token}".encode() if token else None

    @property
    def required(self) -> bool:
        return self._expected is not None

    def given(self, metadata: Metadata | None) -> str | bytes | None:
        return dict(metadata or ()).get("authorization")

    def is_admin(self, metadata: Metadata | None) -> bool:
        if self._expected is None:
            return True
        given = self.given(metadata)
        return isinstance(given, str) and hmac.compare_digest(given.encode(), self._expected)

    def refusal(self, rpc: str, metadata: Metadata | None) -> str | None:
        """Why an admin call `rpc` with this metadata is refused (UNAUTHENTICATED), or None: it may go on."""
        if self.is_admin(metadata):
            return None
        given = self.given(metadata)
        log.warning("admin call refused: %s %s", rpc, "no token" if given is None else "wrong token")
        if given is None:
            return f"{rpc} is an admin call: send the metadata 'authorization: Bearer <admin token>'"
        return f"{rpc}: the admin token is not valid"


class AdminTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: AdminToken, methods: Iterable[str]) -> None:
        self._token = token
        self._methods = frozenset(methods)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        refusal = None
        if method in self._methods:
            refusal = self._token.refusal(method.rsplit("/", 1)[-1], handler_call_details.invocation_metadata)
        return await continuation(handler_call_details) if refusal is None else _refuse(refusal)


def _refuse(message: str) -> grpc.RpcMethodHandler[bytes, None]:
    async def refuse(_request: bytes, context: grpc.aio.ServicerContext[bytes, None]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(refuse)
