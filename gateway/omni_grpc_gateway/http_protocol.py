"""uvicorn's HTTP/1.1 protocol (h11) with the guards a public endpoint needs, which uvicorn lacks.

- A deadline to receive a request: its headers and body must arrive within `request_read_timeout`
  seconds of its first byte (or of the connection opening), else 408 and the connection is closed. A
  client trickling headers byte by byte (slowloris) holds a connection that long at most.
- A cap on open connections: beyond `max_connections` a new one is answered 503 and closed at once.
- The 400s uvicorn answers itself (a malformed request line or header, `Content-Length: +10`) carry an
  OpenAI error object like every other answer of the gateway, not plain text.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from omni_grpc_gateway.errors import error_body


class GuardedH11Protocol(H11Protocol):
    # Set by `guarded_protocol`: uvicorn builds one protocol per connection from the class.
    request_read_timeout: float = 30.0
    max_connections: int = 1000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_deadline: asyncio.TimerHandle | None = None

    # Narrowed to a Transport as uvicorn's own H11Protocol does (asyncio's base takes any BaseTransport).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._answer(503, "the gateway has too many open connections; retry later")
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._disarm()  # the request is in (or the connection is closing): its time is the app's

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # the next request's clock starts with its first byte (uvicorn's keep-alive until then)

    def send_400_response(self, msg: str) -> None:
        self._answer(400, f"invalid HTTP request: {msg}", code="invalid_http")

    def _arm(self) -> None:
        if self._read_deadline is None and self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            self._read_deadline = self.loop.call_later(self.request_read_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _too_slow(self) -> None:
        self._read_deadline = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            message = f"the request did not arrive within {self.request_read_timeout:g} s (--request-read-timeout)"
            self._answer(408, message)

    def _answer(self, status: int, message: str, *, code: str | None = None) -> None:
        """An OpenAI error object, then close: nothing else on this connection can be trusted. Its code is the
        status's own in the gateway's one status table (errors.py) unless a narrower one is given."""
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()  # the app is answering already: the connection just ends
            return
        body = error_body(status, message, code=code)
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode("ascii") + body)
        self.transport.close()


def guarded_protocol(request_read_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn builds for each connection, with these limits."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"request_read_timeout": request_read_timeout, "max_connections": max_connections},
    )
