"""uvicorn's httptools protocol with the two limits it lacks on a request's head (line and headers).

uvicorn arms no timer until a first response is done, and it keeps every header it is sent: a client
can hold a connection forever by trickling its headers (slowloris), or grow the relay's memory without
bound with endless ones. `max_request_bytes` and `request_body_timeout` guard the body; this guards the
head. `relay serve` uses it; with the plain uvicorn CLI pass `--http relay.protocol:GuardedHttpToolsProtocol`
(and RELAY_REQUEST_HEAD_TIMEOUT / RELAY_MAX_HEADER_BYTES in the environment to change the defaults).
"""

from __future__ import annotations

import asyncio
import os

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from relay.replies import error_body

# uvicorn builds this protocol itself, in each worker process, so its two settings (request_head_timeout
# and max_header_bytes) arrive the way RELAY_CONFIG does: `relay serve` puts them in the environment.
HEAD_TIMEOUT_ENV = "RELAY_REQUEST_HEAD_TIMEOUT"
MAX_HEAD_BYTES_ENV = "RELAY_MAX_HEADER_BYTES"


def _reply(status: str, message: str, code: str) -> bytes:
    body = error_body(message, "invalid_request_error", code)
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    return head.encode() + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0
    _refused = False

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # As nginx's client_header_timeout: from the connection's opening (first request) or the first
        # byte of the next request, to the end of the head.
        self.head_timeout = float(os.environ.get(HEAD_TIMEOUT_ENV, "30"))
        self.max_head_bytes = int(os.environ.get(MAX_HEAD_BYTES_ENV, str(64 * 1024)))

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        if not self._refused:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        if not self._refused:
            super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_head_bytes and not self._refused:
            message = f"the request line and headers exceed max_header_bytes ({self.max_head_bytes})"
            self._refuse(_reply("431 Request Header Fields Too Large", message, "headers_too_large"))

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._timed_out)

    def _timed_out(self) -> None:
        message = f"the request line and headers did not arrive within request_head_timeout ({self.head_timeout:g} s)"
        self._refuse(_reply("408 Request Timeout", message, "request_timeout"))

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, reply: bytes) -> None:
        # Before the head is complete no ASGI task exists yet: the answer is written here, and the
        # parser's remaining callbacks for this connection are ignored.
        self._refused = True
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.write(reply)
            self.transport.close()
