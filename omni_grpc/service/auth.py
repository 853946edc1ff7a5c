"""Admin RPCs (LoadAdapter, UnloadAdapter) need a bearer token when the server is given one.

A gRPC server interceptor, so the check happens before the request is even deserialised, and the
servicer stays a plain converter.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

log = logging.getLogger(__name__)


class AdminTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, methods: Iterable[str]) -> None:
        # Compared in constant time; the token itself is never logged.
        self._expected = f"Bearer {token}".encode()
        self._methods = frozenset(methods)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method not in self._methods:
            return await continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization")
        if isinstance(given, str) and hmac.compare_digest(given.encode(), self._expected):
            return await continuation(handler_call_details)
        rpc = method.rsplit("/", 1)[-1]
        if given is None:
            message = f"{rpc} is an admin call: send the metadata 'authorization: Bearer <admin token>'"
        else:
            message = f"{rpc}: the admin token is not valid"
        log.warning("admin call refused: %s %s", rpc, "no token" if given is None else "wrong token")
        return _refuse(message)


def _refuse(message: str) -> grpc.RpcMethodHandler[bytes, None]:
    async def refuse(_request: bytes, context: grpc.aio.ServicerContext[bytes, None]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(refuse)
