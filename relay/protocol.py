"""uvicorn's httptools protocol with the two limits it lacks on a request's head (line and headers), and
a response head that leaves with the body.

uvicorn arms no timer until a first response is done, and it keeps every header it is sent: a client
can hold a connection forever by trickling its headers (slowloris), or grow the relay's memory without
bound with endless ones. `max_request_bytes` and `request_body_timeout` guard the body; this guards the
head. `relay serve` uses it; with the plain uvicorn CLI pass `--http relay.protocol:GuardedHttpToolsProtocol`
(and RELAY_REQUEST_HEAD_TIMEOUT / RELAY_MAX_HEADER_BYTES in the environment to change the defaults).

uvicorn writes a response head to the socket as soon as the app sends http.response.start, and the body
in a second write: two syscalls, two TCP segments and two wake-ups of the client for an answer that the
upstream sent in one. HeadWriter holds the head until the first body write or the end of the event-loop
step, whichever comes first (Go's net/http buffers it the same way, until the first body write).

It also tells the app about the client's connection (scope["relay.client"], a ClientConnection): whether
the body has all arrived, so the app needs no deadline for it; a call when the connection is lost, so the
app needs no task waiting on `receive` to notice; and a way to abort it, since uvicorn's own close waits for
the client to read what is buffered, which a client that stopped reading never does.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from relay.replies import error_body

# uvicorn builds this protocol itself, in each worker process, so its two settings (request_head_timeout
# and max_header_bytes) arrive the way RELAY_CONFIG does: `relay serve` puts them in the environment.
HEAD_TIMEOUT_ENV = "RELAY_REQUEST_HEAD_TIMEOUT"
MAX_HEAD_BYTES_ENV = "RELAY_MAX_HEADER_BYTES"
CLIENT_KEY = "relay.client"


class ClientConnection:
    """One request's view of its client connection, set up by the protocol for the app."""

    __slots__ = ("abort", "body_complete", "lost", "_on_lost")

    def __init__(self, abort: Callable[[], None]) -> None:
        self.abort = abort  # close now, dropping whatever the client has not read
        self.body_complete = False  # the whole request body has arrived
        self.lost = False
        self._on_lost: Callable[[], None] | None = None

    def watch(self, on_lost: Callable[[], None]) -> None:
        """Call `on_lost` once if the connection is lost (at once if it already is), until unwatch()."""
        if self.lost:
            on_lost()
        else:
            self._on_lost = on_lost

    def unwatch(self) -> None:
        self._on_lost = None

    def connection_lost(self) -> None:
        self.lost = True
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost()


class HeadWriter:
    """The transport of one response cycle: its first write (the head) is held back, and leaves with
    the second write (the first body chunk) in one writev, or alone at the end of the event-loop step.
    A stream whose first event is not there yet thus gets its head at once; a buffered answer goes out
    whole. Everything else goes straight to the connection's transport."""

    __slots__ = ("_transport", "_loop", "_head", "_started")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = None
        self._started = False

    def write(self, data: bytes) -> None:
        if not self._started:
            self._started = True
            self._head = data
            self._loop.call_soon(self._flush)
        elif self._head is not None:
            head, self._head = self._head, None
            self._transport.writelines((head, data))
        else:
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def _flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            if not self._transport.is_closing():
                self._transport.write(head)


def _reply(status: str, message: str, code: str) -> bytes:
    body = error_body(message, "invalid_request_error", code)
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    return head.encode() + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # As nginx's client_header_timeout: from the connection's opening (first request) or the first
        # byte of the next request, to the end of the head.
        self.head_timeout = float(os.environ.get(HEAD_TIMEOUT_ENV, "30"))
        self.max_head_bytes = int(os.environ.get(MAX_HEAD_BYTES_ENV, str(64 * 1024)))
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
            elif self.cycle is None or self.cycle.response_complete:
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
            # A head that ends in this chunk is at most the earlier chunks plus this one: measured only
            # when that could be over the limit (a big first chunk), so the usual request counts nothing.
            limit = self.max_head_bytes
            if self._head_bytes + self._chunk_bytes > limit and self._parsed_head_bytes() > limit:
                self._too_large()
            elif self.parser.should_upgrade():
                # httptools hands all that follows an Upgrade head to the new protocol, and uvicorn, which
                # switches to none here, would drop the body or parse it as a request of its own.
                message = "the relay does not switch protocols: send the request without Upgrade"
                self._refuse(_reply("400 Bad Request", message, "upgrade_not_supported"))
        if self._refused:
            return
        self._client = ClientConnection(self.transport.abort)
        self.scope[CLIENT_KEY] = self._client  # type: ignore[literal-required]
        super().on_headers_complete()
        self.cycle.transport = HeadWriter(self.transport, self.loop)  # type: ignore[assignment]

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
        if self._client is not None and self.cycle is not None and not self.cycle.response_complete:
            self._client.connection_lost()

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
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # let the answer in progress finish, then close
            return
        if not self.transport.is_closing():
            self.transport.write(reply)
            self.transport.close()
