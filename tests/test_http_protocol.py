"""The answers the gateway's HTTP protocol writes itself, below the app (408, 503, 400): the status line's
phrase is HTTP's own, and the error object's code is the one the gateway's status table gives that status."""

from __future__ import annotations

import json
import socket
from http import HTTPStatus
from pathlib import Path
from typing import Any

from omni_grpc.loopback import free_port
from tests.helpers import start_gateway


def answer_of(sock: socket.socket) -> tuple[bytes, dict[str, Any]]:
    """The status line and the error object of an answer that ends with the connection."""
    sock.settimeout(30)
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head and b"connection: close" in head, head
    return head.split(b"\r\n", 1)[0], json.loads(body)["error"]


def status_line(status: int) -> bytes:
    return f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()


def test_protocol_answers_take_their_code_from_the_status_table(tmp_path: Path) -> None:
    # No gRPC server behind it: these answers never reach the app.
    args = ["--max-connections", "1", "--request-read-timeout", "3"]
    gateway = start_gateway(f"127.0.0.1:{free_port()}", args, log_path=tmp_path / "gw.log")
    try:
        with socket.create_connection(("127.0.0.1", gateway.port)) as held:
            held.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            with socket.create_connection(("127.0.0.1", gateway.port)) as extra:
                line, error = answer_of(extra)
            assert line == status_line(503) and b"Service Unavailable" in line
            assert (error["code"], error["type"]) == ("unavailable", "service_unavailable_error")
            line, error = answer_of(held)
            assert line == status_line(408) and error["code"] == "request_timeout"
        with socket.create_connection(("127.0.0.1", gateway.port)) as odd:
            odd.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: +10\r\n\r\n")
            line, error = answer_of(odd)
        assert line == status_line(400) and error["code"] == "invalid_http"
    finally:
        gateway.stop()
