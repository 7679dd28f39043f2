"""uvicorn's httptools protocol with the limits it lacks on a request's head, a response head that leaves
with the body, and what the app needs to know about the client's connection.

uvicorn arms no timer until a first response is done, and it keeps every header it is sent: a client
can hold a connection forever by trickling its headers (slowloris), or grow the relay's memory without
bound with endless ones. `max_request_bytes` and `request_body_timeout` guard the body; this guards the
head. It also refuses a request whose absolute-form target (`POST http://host/...`) names another
authority than its Host header (uvicorn keeps only the path), and an Upgrade request (uvicorn would drop
its body or parse it as a request of its own). `relay serve` uses it; with the plain uvicorn CLI pass
`--http relay.protocol:GuardedHttpToolsProtocol` (RELAY_REQUEST_HEAD_TIMEOUT / RELAY_MAX_HEADER_BYTES in
the environment change the defaults; they are read once per process).

Each request's scope carries a ClientConnection (relay.client_connection): whether the body has all
arrived, a call when the connection is lost, a way to abort it. Everything this relies on inside uvicorn
is listed in relay.seams.uvicorn_internals.
"""

from __future__ import annotations

import asyncio
import functools
import os

import httptools

from relay.client_connection import CLIENT_KEY, ClientConnection
from relay.head_writer import HeadWriter
from relay.host_names import split_authority
from relay.replies import error_body
from relay.seams.uvicorn_internals import HttpToolsProtocol, close_after_response, response_open, write_through

# uvicorn builds this protocol itself, in each worker process, so its two settings arrive the way
# RELAY_CONFIG does: `relay serve` puts them in the environment.
HEAD_TIMEOUT_ENV = "RELAY_REQUEST_HEAD_TIMEOUT"
MAX_HEAD_BYTES_ENV = "RELAY_MAX_HEADER_BYTES"


@functools.cache
def head_limits() -> tuple[float, int]:
    """(request_head_timeout, max_header_bytes) of this process."""
    return float(os.environ.get(HEAD_TIMEOUT_ENV, "30")), int(os.environ.get(MAX_HEAD_BYTES_ENV, str(64 * 1024)))


def _reply(status: str, message: str, code: str) -> bytes:
    body = error_body(message, "invalid_request_error", code)
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    return head.encode() + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # As nginx's client_header_timeout: from the connection's opening (first request) or the first
        # byte of the next request, to the end of the head.
        self.head_timeout, self.max_head_bytes = head_limits()
        self._head_open = False  # a request head has begun (or may begin: a new connection) and is not done
        self._head_bytes = 0  # wire bytes of chunks that ended with the head still open
        self._chunk_bytes = 0  # size of the chunk being parsed
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._client: ClientConnection | None = None  # the latest request's

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_open = True
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # nothing more is parsed, so no request can start after a refusal
        self._chunk_bytes = len(data)
        super().data_received(data)
        if self._head_open and not self._refused:
            # The head is still not complete after this chunk, so all of it was head. httptools hands
            # over a header only once it ends: counting wire bytes is what bounds one that never does.
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._too_large()
            elif not response_open(self.cycle):
                # Only a head split across chunks needs the timer (most arrive whole, and pay nothing).
                # A pipelined head that arrives while an answer is still going out is timed from that
                # answer's end (on_response_complete), so a refusal is never written into the middle of it.
                self._arm_head_timer()

    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        self._head_open = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._cancel_head_timer()
        if not self._refused:
            self._check_head()
        if self._refused:
            return
        self._client = ClientConnection(self.transport.abort)
        self.scope[CLIENT_KEY] = self._client  # type: ignore[literal-required]
        super().on_headers_complete()
        write_through(self.cycle, HeadWriter(self.transport, self.loop))

    def on_body(self, body: bytes) -> None:
        if not self._refused:  # the rest of a chunk is still parsed after a refusal: ignore it
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()
            if self._client is not None:
                self._client.body_complete = True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._head_open:
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)
        # What uvicorn tells through http.disconnect, and to the same request: the latest one (with
        # pipelining, not one still answering ahead of it).
        if self._client is not None and response_open(self.cycle):
            self._client.connection_lost()

    def _check_head(self) -> None:
        # A head that ends in this chunk is at most the earlier chunks plus this one: measured only when
        # that could be over the limit (a big first chunk), so the usual request counts nothing.
        limit = self.max_head_bytes
        if self._head_bytes + self._chunk_bytes > limit and self._parsed_head_bytes() > limit:
            self._too_large()
        elif self.parser.should_upgrade():
            message = "the relay does not switch protocols: send the request without Upgrade"
            self._refuse(_reply("400 Bad Request", message, "upgrade_not_supported"))
        elif self.url[:1] != b"/" and not _same_authority(self.url, self.headers):
            message = "the request target names another host than the Host header"
            self._refuse(_reply("400 Bad Request", message, "invalid_host"))

    def _parsed_head_bytes(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)  # ": ", CRLF

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and self.head_timeout > 0:
            self._head_timer = self.loop.call_later(self.head_timeout, self._timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _too_large(self) -> None:
        message = f"the request line and headers exceed max_header_bytes ({self.max_head_bytes})"
        self._refuse(_reply("431 Request Header Fields Too Large", message, "headers_too_large"))

    def _timed_out(self) -> None:
        self._head_timer = None
        message = f"the request line and headers did not arrive within request_head_timeout ({self.head_timeout:g} s)"
        self._refuse(_reply("408 Request Timeout", message, "request_timeout"))

    def _refuse(self, reply: bytes) -> None:
        # Before the head is complete no ASGI task exists for it: the answer is written here.
        self._refused = True
        self._cancel_head_timer()
        if response_open(self.cycle):
            close_after_response(self.cycle)  # let the answer in progress finish, then close
            return
        if not self.transport.is_closing():
            self.transport.write(reply)
            self.transport.close()


_DEFAULT_PORTS = {b"http": 80, b"https": 443}


def _same_authority(target: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
    """An absolute-form target (RFC 9112 §3.2.2) names the Host header's authority. `OPTIONS *` and a
    target that is no URL at all are left to the router, which answers 404."""
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        return True
    if not url.host:
        return True
    host = next((value for name, value in headers if name == b"host"), None)
    given = split_authority(host) if host is not None else None
    if given is None:
        return False
    default = _DEFAULT_PORTS.get((url.schema or b"").lower())
    return given[0] == url.host.lower() and (given[1] or default) == (url.port or default)
