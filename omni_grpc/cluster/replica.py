"""One replica of the cluster: today's engine and today's servicer, behind Serve.

The ingress hands each call over as the request's bytes and the caller's metadata; the replica runs the very
servicer method `omni-grpc serve` runs, on a relayed context that captures an abort as a status (code,
details, rich-status trailers) instead of ending a gRPC call. So validation, limits, admin tokens and every
error are the single server's, to the byte.

The replica keeps in step with the registry: the admins' loads (pins included) and unloads, applied on every
replica, and a report of what it holds, for ListAdapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import ray
from google.protobuf.message import Message
from ray import serve

from omni_grpc.cli import build_parser, server_config_from_args
from omni_grpc.cluster.registry import REGISTRY_NAME
from omni_grpc.engine.engine import Engine
from omni_grpc.errors import OmniError
from omni_grpc.quoting import loggable
from omni_grpc.service.auth import ADMIN_METHODS, AdminToken
from omni_grpc.service.servicer import OmniServicer
from omni_grpc.shared.logs import configure_logging
from omni_grpc.v1 import omni_pb2 as pb

log = logging.getLogger(__name__)
Metadata = Sequence[tuple[str, str | bytes]]
# A reply: ("ok", message bytes) or ("error", code name, details, trailing metadata).
Reply = tuple[Any, ...]
SYNC_EVERY_S = 0.5


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, trailing: Metadata) -> None:
        super().__init__(details)
        self.code, self.details, self.trailing = code, details, list(trailing or ())


class RelayedContext:
    """What the servicer asks of its context, for a call that came through the ingress."""

    def __init__(self, metadata: Metadata, timeout: float | None) -> None:
        self._metadata = tuple(metadata)
        # The caller's deadline, as seconds left when the ingress passed the call on (None: no deadline).
        self._deadline = time.monotonic() + timeout if timeout is not None else None
        self._done: list[Callable[[Any], None]] = []

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def peer(self) -> str:
        return "ray-serve-ingress"

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._done.append(callback)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()) -> None:
        raise Aborted(code, details, trailing_metadata)

    def finish(self) -> None:
        for callback in self._done:
            callback(self)


def error_reply(exc: Aborted) -> Reply:
    return ("error", exc.code.name, exc.details, exc.trailing)


class OmniReplica:
    """The replica deployment's class (the deployment options are set in `deploy`)."""

    def __init__(self, serve_args: list[str]) -> None:
        args = build_parser().parse_args(["serve", *serve_args])
        # Our lines (one per request) to the worker's stderr, which Ray keeps in its session's logs.
        configure_logging(args.log_level, args.log_format, logger="omni_grpc")
        config = server_config_from_args(args)
        engine_config = dataclasses.replace(config.engine, reserve_admin_adapters=bool(config.admin_token))
        self.engine = Engine(engine_config).start()
        cfg = engine_config
        executor = ThreadPoolExecutor(max_workers=(cfg.max_queue or 256) + cfg.max_batch_size + 16)
        # The single server checks the token in an interceptor; here, in `call` and for the ingress.
        self.token = AdminToken(config.admin_token)
        self.servicer = OmniServicer(self.engine, executor, self.token, max_request_bytes=config.max_request_bytes)
        context = serve.get_replica_context()
        self.name = context.replica_id.unique_id
        # Ray types an actor's methods loosely: the registry is used as what it is, untyped.
        self.registry: Any = ray.get_actor(REGISTRY_NAME, namespace="serve")
        self._seen_version = 0
        self._sync_lock = asyncio.Lock()
        self._syncing: asyncio.Task[None] | None = None

    # ---- Serve's multiplexing: which adapters this replica holds, as Serve routes by them ----------------

    async def holding(self, route: str) -> str:
        """Replaced in `replica_class` by Serve's multiplexed LRU, sized like the engine's device tier."""
        return route

    async def _note_route(self) -> None:
        route = serve.get_multiplexed_model_id()
        if route:
            await self.holding(route)

    # ---- the RPCs ------------------------------------------------------------------------------------------

    async def generate(self, payload: bytes, metadata: Metadata, timeout: float | None) -> Reply:
        await self._ready_for_call()
        request = pb.GenerateRequest.FromString(payload)
        context = RelayedContext(metadata, timeout)
        try:
            # The servicer is typed for a grpc.aio context; the relayed one has what it uses (duck-typed).
            response = await self.servicer.Generate(request, context)  # type: ignore[arg-type]
        except Aborted as exc:
            return error_reply(exc)
        finally:
            context.finish()
        response.replica = self.name
        return ("ok", response.SerializeToString())

    async def generate_stream(self, payload: bytes, metadata: Metadata, timeout: float | None) -> AsyncIterator[Reply]:
        await self._ready_for_call()
        request = pb.GenerateStreamRequest.FromString(payload)
        context = RelayedContext(metadata, timeout)
        try:
            # The relayed context again (see generate).
            async for event in self.servicer.GenerateStream(request, context):  # type: ignore[arg-type]
                if event.HasField("result"):
                    event.result.replica = self.name
                yield ("ok", event.SerializeToString())
        except Aborted as exc:
            yield error_reply(exc)
        finally:
            context.finish()

    async def call(self, method: str, payload: bytes, metadata: Metadata) -> Reply:
        """LoadAdapter, UnloadAdapter, ListAdapters or GetServerInfo, as the single server answers them."""
        await self._ready_for_call()
        kinds: dict[str, type[Message]] = {
            "LoadAdapter": pb.LoadAdapterRequest,
            "UnloadAdapter": pb.UnloadAdapterRequest,
            "ListAdapters": pb.ListAdaptersRequest,
            "GetServerInfo": pb.GetServerInfoRequest,
        }
        refusal = self.admin_refusal(method, metadata) if method in ADMIN_METHODS else None
        if refusal is not None:
            return ("error", grpc.StatusCode.UNAUTHENTICATED.name, refusal, [])
        request = kinds[method].FromString(payload)
        context = RelayedContext(metadata, None)
        try:
            response = await getattr(self.servicer, method)(request, context)
        except Aborted as exc:
            return error_reply(exc)
        finally:
            context.finish()
        return ("ok", response.SerializeToString(), self.name)

    def admin_refusal(self, method: str, metadata: Metadata) -> str | None:
        """Why this admin call is refused (the single server's words), or None."""
        return self.token.refusal(method, metadata)

    def is_admin(self, metadata: Metadata) -> bool:
        return self.token.is_admin(metadata)

    # ---- keeping in step with the registry -----------------------------------------------------------------

    async def _ready_for_call(self) -> None:
        await self._note_route()
        if self._syncing is None:  # the first call starts the background sync, on the replica's own loop
            self._syncing = asyncio.create_task(self._sync_forever())
        # An admin's load or unload that the registry confirmed holds for every call after it.
        await self._catch_up()

    async def _sync_forever(self) -> None:
        while True:
            try:
                await self._catch_up()
                adapters = [a.SerializeToString() for a in await asyncio.to_thread(self._holding)]
                await self.registry.report.remote(self.name, adapters, self._seen_version)
            except Exception:  # the registry restarting, say: try again
                log.exception("replica %s could not sync with the adapter registry", self.name)
            await asyncio.sleep(SYNC_EVERY_S)

    async def _catch_up(self) -> None:
        """Apply the admins' loads and unloads made since the last catch-up (one call to the registry)."""
        async with self._sync_lock:
            version, loads, unloads, stale = await self.registry.changes_since.remote(self._seen_version)
            if version != self._seen_version:
                await asyncio.to_thread(self._apply, loads, unloads, stale)
                self._seen_version = version

    def _apply(self, loads: list[dict[str, Any]], unloads: list[dict[str, Any]], stale: bool) -> None:
        if stale:  # some unloads were missed: keep only what the admins loaded (the rest loads again on demand)
            kept = {(spec["path"], spec["expert"] or "") for spec in loads}
            unloads = [
                {"path": a.path, "expert": a.expert}
                for a in self.engine.list_adapters()
                if (a.path, a.expert) not in kept
            ]
        for spec in unloads:
            with contextlib.suppress(OmniError):  # never loaded here, or unloaded already
                self.engine.unload_adapter(path=spec["path"], expert=spec["expert"] or None)
        for spec in loads:
            try:
                self.engine.load_adapter(
                    spec["path"], name=spec["name"], adapter_id=spec["id"], pin=spec["pin"], expert=spec["expert"]
                )
            except OmniError as exc:  # it loaded on the replica that validated it; here it did not
                log.warning(
                    "replica %s could not load %s: %s", self.name, loggable(spec["path"]), loggable(exc.message)
                )

    def _holding(self) -> list[pb.Adapter]:
        from omni_grpc.service import convert

        return [convert.adapter_to_pb(info) for info in self.engine.list_adapters()]

    def check_health(self) -> None:
        if not self.engine.ready:
            raise RuntimeError("the engine is not ready")


def replica_class(device_adapters: int) -> type[OmniReplica]:
    """The replica deployment's class, whose multiplexed ids (what Serve believes each replica holds) are an LRU
    as large as the engine's device tier: Serve then routes to replicas holding an adapter on the device."""

    class Replica(OmniReplica):
        # Serve's decorator is untyped; the method it wraps is typed.
        @serve.multiplexed(max_num_models_per_replica=device_adapters or 1024)  # type: ignore[untyped-decorator]
        async def holding(self, route: str) -> str:
            return route

    return Replica
