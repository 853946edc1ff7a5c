"""A call its client cancelled is cancelled in the deployment too, whenever the cancellation lands.

Serve's gRPC proxy cancels its call into the deployment only when the client's cancellation reaches it while it
awaits the deployment's next result (`ProxyResponseGenerator.__anext__`). A client that cancels as soon as a
message arrives races with the proxy's write of that message: when the cancellation lands during the write, the
proxy's generators are left suspended, nothing cancels the deployment's call, and the replica denoises to the
last step (Serve's own analysis: ray-project/ray#42665, not merged). `cancel_abandoned_calls` runs as part of the
cluster's worker setup hook, in the proxy's process: it ties every deployment call the proxy makes to the gRPC
call it serves, and when that call ends, cancels those the proxy had not read to their end. (gRPC does not
count such a call as cancelled: its write fails instead, so the test is whether the proxy finished reading.)
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

# The proxy's task serving one gRPC call -> the deployment calls it made: (Serve's reader of the response, the
# response).
_CALLS: weakref.WeakKeyDictionary[asyncio.Task[Any], list[tuple[Any, Any]]] = weakref.WeakKeyDictionary()
_MARK = "omni_cancels_abandoned"


def cancel_abandoned_calls() -> None:
    from ray.serve._private.proxy_response_generator import ProxyResponseGenerator
    from ray.serve.grpc_util import RayServegRPCContext

    if getattr(ProxyResponseGenerator.__init__, _MARK, False):
        return
    made = ProxyResponseGenerator.__init__
    opened = RayServegRPCContext.__init__

    def make(self: ProxyResponseGenerator, response: Any, *args: Any, **kwargs: Any) -> None:
        made(self, response, *args, **kwargs)
        task = _current_task()
        if task is not None:
            _CALLS.setdefault(task, []).append((self, response))

    def open_call(self: RayServegRPCContext, grpc_context: Any) -> None:
        opened(self, grpc_context)
        task = _current_task()
        if task is not None and hasattr(grpc_context, "add_done_callback"):
            grpc_context.add_done_callback(lambda _context: _ended(task))

    setattr(make, _MARK, True)
    ProxyResponseGenerator.__init__ = make  # type: ignore[method-assign]  # Serve has no hook for this
    RayServegRPCContext.__init__ = open_call  # type: ignore[method-assign]  # (nor for this)


def _ended(task: asyncio.Task[Any]) -> None:
    for reader, response in _CALLS.pop(task, []):
        # Serve's reader marks itself done once it has read the last result (or failed, or was cancelled).
        if not getattr(reader, "_done", False):
            response.cancel()


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop: not a call being served
        return None
