"""Client-side helpers shared by the test files: raw HTTP/1.1 on sockets (so a test controls every byte
and sees truncation as the standard library's IncompleteRead), and what the fake upstream received."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bench.upstream import Recorded, UpstreamThread
from tests.servers import MODEL, RelayServer

# Every socket operation is bounded: a relay that waits where it should answer fails the test, not CI.
TIMEOUT = 10.0
CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
CHAT_BODY = b'{"messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = b'{"messages":[{"role":"user","content":"hi"}],"stream":true}'


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def json(self) -> Any:
        return json.loads(self.body)


def request_head(
    method: str, target: str, headers: Mapping[str, str] | None = None, length: int | None = None
) -> bytes:
    """A request line and headers, exactly as given; Content-Length only when `length` is given."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def post_bytes(body: bytes, target: str = CHAT, headers: Mapping[str, str] | None = None) -> bytes:
    """A complete POST with a JSON content type (unless `headers` says otherwise)."""
    return request_head("POST", target, {"Content-Type": "application/json", **(headers or {})}, len(body)) + body


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def read_head(sock: socket.socket) -> http.client.HTTPResponse:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response


def read_to_end(response: http.client.HTTPResponse) -> tuple[bytes, bool]:
    """The body bytes received, and whether its framing (Content-Length or chunks) said it was complete.

    A socket timeout is not caught: a relay that leaves the client waiting fails the test."""
    try:
        return response.read(), True
    except http.client.IncompleteRead as exc:
        return exc.partial, False
    except ConnectionResetError:
        return b"", False


def exchange(port: int, raw: bytes) -> Reply:
    """Send raw bytes on a new connection and read one complete reply."""
    with connect(port) as sock:
        sock.sendall(raw)
        response = read_head(sock)
        body, complete = read_to_end(response)
        assert complete, f"reply {response.status} was truncated after {len(body)} bytes"
        return Reply(response.status, response.headers, body)


def post(server: RelayServer, body: bytes = CHAT_BODY, target: str = CHAT, headers: Mapping[str, str] | None = None) -> Reply:
    return exchange(server.port, post_bytes(body, target, headers))


def assert_chat_completion(reply: Reply) -> None:
    """A whole, successful, non-stream chat completion answered through the relay."""
    assert reply.status == 200, reply.body
    payload = reply.json()
    assert payload["object"] == "chat.completion"
    assert payload["model"] == MODEL


def requests_seen(upstream: UpstreamThread, count: int) -> list[Recorded]:
    """Exactly `count` requests reached the upstream in this test (a relay that retried, followed a
    redirect or answered by itself shows here); they are returned in arrival order."""
    seen = list(upstream.upstream.requests)
    assert len(seen) == count, [request.path for request in seen]
    return seen


def header_values(request: Recorded, name: str) -> list[str]:
    """Every value of a header, so a duplicate shows as well as an absence."""
    return [value for key, value in request.headers if key == name]
