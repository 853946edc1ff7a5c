"""ASGI middleware: a cap on request bodies, JSON bodies only (forms where a route takes them), and one log line
per request for operators."""

from __future__ import annotations

import logging
import time

from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omni_grpc_gateway.errors import ApiError, error_response
from omni_grpc_gateway.form_bodies import FORM_TYPES
from omni_grpc_gateway.log_values import loggable
from omni_grpc_gateway.metrics import UNMATCHED, GatewayMetrics

log = logging.getLogger("omni_grpc_gateway.access")


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413, whether announced by Content-Length or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await error_response(413, self._message())(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"the request body exceeds the gateway's limit of {self.limit} bytes"


class RequireJson:
    """A body that is not labelled JSON is refused with 415 naming the header (curl -d sends a form), except on
    `form_paths`, which take form fields too."""

    def __init__(self, app: ASGIApp, form_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.form_paths = form_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            content_type = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
            is_json = content_type == b"application/json" or content_type.endswith(b"+json")
            forms = scope["path"] in self.form_paths
            if not is_json and not (forms and content_type in FORM_TYPES):
                also = " (or as form fields: multipart/form-data)" if forms else ""
                message = f"send the body as JSON with the header Content-Type: application/json{also}"
                await error_response(415, message)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class AccessLog:
    """`POST /v1/chat/completions status=200 adapter=style images=1 ms=812.4` for every request, and its count
    and latency in the gateway's metrics."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            seconds = time.perf_counter() - start
            route = _route_of(scope)
            self.metrics.observe(route, status, seconds)
            state = Request(scope).state
            fields = {
                "method": loggable(scope["method"]),
                "path": loggable(scope["path"]),
                "route": route,
                "status": status,
                "adapter": loggable(getattr(state, "adapter", "-")),
                "images": getattr(state, "images", "-"),
                "ms": round(seconds * 1000, 1),
            }
            log.info(
                "%s %s status=%d adapter=%s images=%s ms=%.1f",
                fields["method"],
                fields["path"],
                status,
                fields["adapter"],
                fields["images"],
                seconds * 1000,
                extra=fields,
            )


def _route_of(scope: Scope) -> str:
    """The template of the route a request matched (FastAPI's own routes, /openapi.json included), else UNMATCHED:
    never the raw path, which would make a metric label of every URL a client invents."""
    route = scope.get("route")
    if route is None:
        app = scope.get("app")
        route = next((r for r in getattr(app, "routes", ()) if r.matches(scope)[0] is Match.FULL), None)
    return str(getattr(route, "path", UNMATCHED))
