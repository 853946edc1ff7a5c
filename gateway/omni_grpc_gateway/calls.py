"""Running gRPC calls for a route: status mapping, cancellation when the HTTP client leaves."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from typing import TypeVar

import grpc
from fastapi import Request

from omni_grpc_gateway.errors import ApiError, from_rpc_error

T = TypeVar("T")

# How often a waiting route checks that its HTTP client is still there.
_DISCONNECT_POLL_S = 0.25


async def rpc(call: Awaitable[T], *, request: Request | None = None, params: Mapping[str, str] | None = None) -> T:
    """Await a gRPC call; its failure becomes an ApiError. If `request`'s client disconnects, the call is
    cancelled, so the server stops denoising for nobody and frees the adapter."""
    task = asyncio.ensure_future(call)
    try:
        while request is not None:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                break
            if await request.is_disconnected():
                raise ApiError(499, "the client closed the connection")
        return await task
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc, params) from None
    finally:
        if not task.done():
            task.cancel()
