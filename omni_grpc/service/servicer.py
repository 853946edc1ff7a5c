"""OmniService: convert protobuf to plain types, call the engine off the event loop, convert back.

Errors: every OmniError becomes its own gRPC status (rich status with BadRequest details when a field
is at fault); anything unexpected becomes INTERNAL for that request only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any, NoReturn, TypeVar, cast

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from omni_grpc.engine.engine import Engine
from omni_grpc.engine.progress import Progress, ProgressEvent
from omni_grpc.errors import InvalidArgument, OmniError, Unavailable
from omni_grpc.service import convert
from omni_grpc.service.auth import AdminToken
from omni_grpc.v1 import omni_pb2 as pb
from omni_grpc.v1 import omni_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
# Every method's context; the servicer reads and writes no messages through it, only status and deadline.
Context = grpc.aio.ServicerContext[Any, Any]


class OmniServicer(omni_pb2_grpc.OmniServiceServicer):
    def __init__(
        self, engine: Engine, executor: Executor, token: AdminToken, *, max_request_bytes: int = 1 << 20
    ) -> None:
        self._engine = engine
        self._executor = executor
        self._token = token
        self._max_request_bytes = max_request_bytes
        self._accepting = True
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._started_at = int(time.time())

    def stop_accepting(self) -> None:
        """From now on every new call is UNAVAILABLE; calls already running go on."""
        self._accepting = False

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is running; False if `timeout` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def Generate(self, request: pb.GenerateRequest, context: Context) -> pb.GenerateResponse:
        cancelled = threading.Event()
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None

        def work() -> pb.GenerateResponse:
            plain = convert.generate_request_from_pb(request)
            result = self._engine.generate(plain, cancelled=cancelled.is_set, deadline=deadline)
            return convert.generate_response_to_pb(result)

        try:
            return await self._call(work, context, request)
        except asyncio.CancelledError:
            # The client went away or its deadline passed: stop the denoising at the next step.
            cancelled.set()
            raise

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: Context
    ) -> AsyncIterator[pb.GenerateEvent]:
        cancelled = threading.Event()
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[pb.GenerateEvent] = asyncio.Queue()

        def tell(event: ProgressEvent) -> None:  # on the engine's threads
            loop.call_soon_threadsafe(events.put_nowait, convert.progress_event_to_pb(event))

        progress = Progress(tell, preview_every=request.preview_every_steps)

        def work() -> pb.GenerateResponse:
            plain = convert.generate_request_from_pb(request.request)
            result = self._engine.generate(plain, cancelled=cancelled.is_set, deadline=deadline, progress=progress)
            return convert.generate_response_to_pb(result)

        call = asyncio.ensure_future(self._call(work, context, request))
        try:
            while not call.done():
                next_event = asyncio.ensure_future(events.get())
                await asyncio.wait({next_event, call}, return_when=asyncio.FIRST_COMPLETED)
                if next_event.done():
                    yield next_event.result()
                else:
                    next_event.cancel()
            # Every event was queued before the reply was made: they go first, then the reply.
            while not events.empty():
                yield events.get_nowait()
            yield pb.GenerateEvent(result=await call)
        finally:
            # The client went away, its deadline passed, or the stream ended: stop the denoising at the next step.
            cancelled.set()
            if not call.done():
                call.cancel()

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: Context) -> pb.LoadAdapterResponse:
        def work() -> pb.LoadAdapterResponse:
            info, newly = self._engine.load_adapter(
                request.path,
                name=request.name or None,
                adapter_id=request.id if request.HasField("id") else None,
                pin=request.pin,
                expert=request.expert or None,
            )
            return pb.LoadAdapterResponse(adapter=convert.adapter_to_pb(info), newly_loaded=newly)

        return await self._call(work, context, request)

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context: Context) -> pb.UnloadAdapterResponse:
        def work() -> pb.UnloadAdapterResponse:
            info = self._engine.unload_adapter(**convert.unload_selector_from_pb(request))
            return pb.UnloadAdapterResponse(adapter=convert.adapter_to_pb(info))

        return await self._call(work, context, request)

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context: Context) -> pb.ListAdaptersResponse:
        def work() -> pb.ListAdaptersResponse:
            # The server's own paths are for admins only (every caller is one when no token is set).
            show_paths = self._token.is_admin(context.invocation_metadata())
            adapters = [convert.adapter_to_pb(info, show_path=show_paths) for info in self._engine.list_adapters()]
            config = self._engine.config
            return pb.ListAdaptersResponse(
                adapters=adapters,
                max_loaded_adapters=config.max_loaded_adapters,
                max_device_adapters=config.max_device_adapters,
                max_host_adapters=config.max_host_adapters,
            )

        return await self._call(work, context, request)

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: Context) -> pb.GetServerInfoResponse:
        def work() -> pb.GetServerInfoResponse:
            return convert.server_info_to_pb(self._engine.pipeline, started_at=self._started_at)

        return await self._call(work, context, request)

    async def _call(self, work: Callable[[], T], context: Context, request: Message) -> T:
        if not self._accepting:
            await _abort(context, Unavailable("the server is shutting down; retry on another replica"))
        if (size := request.ByteSize()) > self._max_request_bytes:
            limit = self._max_request_bytes
            await _abort(
                context, InvalidArgument(f"the request is {size} bytes; the limit is {limit} (--max-request-bytes)")
            )
        loop = asyncio.get_running_loop()
        self._in_flight += 1
        self._idle.clear()
        # Idle only once the reply has gone out, not when this method returns: a drain that stopped the
        # server in between would cancel a finished call.
        # (types-grpcio declares the callback type as a class, not a Protocol: a function needs the cast.)
        context.add_done_callback(cast(Any, self._call_done))
        try:
            return await loop.run_in_executor(self._executor, work)
        except OmniError as exc:
            await _abort(context, exc)
        except Exception:
            log.exception("unexpected failure in a call from %s", context.peer())
            await _abort(context, OmniError("internal error; the server logged the details"))

    def _call_done(self, _context: Context) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()


# The longest status message sent: every message quotes client values cut short, and this keeps any that
# grew anyway far inside gRPC's metadata limit (a message over it reaches the client as RESOURCE_EXHAUSTED).
MAX_MESSAGE_CHARS = 2000


async def _abort(context: Context, exc: OmniError) -> NoReturn:
    message = exc.message if len(exc.message) <= MAX_MESSAGE_CHARS else exc.message[:MAX_MESSAGE_CHARS] + "...(cut)"
    status = status_pb2.Status(code=getattr(code_pb2, exc.code), message=message)
    if exc.field:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=message)]
            )
        )
        status.details.append(detail)
    rich = rpc_status.to_status(status)
    await context.abort(rich.code, rich.details, rich.trailing_metadata)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
