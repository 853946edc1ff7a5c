"""`cluster.abandoned_calls`: a client that cancels while Serve's proxy is writing to it still cancels the
proxy's call into the deployment. A real grpc.aio server serves a stream the way Serve's proxy does (its
`RayServegRPCContext`, then a `ProxyResponseGenerator` over the deployment's response); the client stops
reading, so the server is held in a write by flow control, and cancels there: the race Serve loses
(ray-project/ray#42665). The deployment's response is the one stand-in: its `cancel` is what is watched."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from omni_grpc.loopback import free_port

pytest.importorskip("ray.serve", reason="the cluster extra (ray[serve]) is not installed")

from ray.serve._private.proxy_response_generator import ProxyResponseGenerator
from ray.serve.grpc_util import RayServegRPCContext

from omni_grpc.cluster.abandoned_calls import cancel_abandoned_calls

METHOD = "/test.Abandoned/Stream"
CHUNK = b"x" * (1 << 20)


class DeploymentCall:
    """Where Serve's DeploymentResponseGenerator would be: records that the proxy cancelled it."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.writing = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


@pytest.fixture
def stream_server() -> Iterator[tuple[str, list[DeploymentCall]]]:
    calls: list[DeploymentCall] = []
    loop = asyncio.new_event_loop()
    port = free_port()

    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        RayServegRPCContext(context)  # as Serve's gRPCProxyRequest makes it
        call = DeploymentCall()
        calls.append(call)
        ProxyResponseGenerator(call)  # type: ignore[arg-type]  # (the stand-in for Serve's response)
        for _ in range(256):  # far more than the flow-control window: the write blocks once it is full
            call.writing.set()
            yield CHUNK

    async def start() -> grpc.aio.Server:
        server = grpc.aio.server()
        handler = grpc.unary_stream_rpc_method_handler(stream)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Abandoned", {"Stream": handler}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        return server

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield f"127.0.0.1:{port}", calls
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def cancel_while_the_server_writes(target: str, calls: list[DeploymentCall]) -> DeploymentCall:
    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 1 << 21)]) as channel:
        call = channel.unary_stream(METHOD)(b"")
        next(call)  # one chunk read; then none: the server fills the window and waits in its write
        assert calls and calls[0].writing.wait(10)
        threading.Event().wait(1.0)
        call.cancel()
    return calls[0]


def test_a_call_cancelled_during_a_write_is_cancelled_in_the_deployment(
    stream_server: tuple[str, list[DeploymentCall]],
) -> None:
    cancel_abandoned_calls()
    call = cancel_while_the_server_writes(*stream_server)
    assert call.cancelled.wait(10), "the proxy's call into the deployment was left running"
