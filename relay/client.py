"""The upstream side of a process: one aiohttp connection pool, the slots that cap requests in flight,
the retry policy, and the POST of one relayed request.

Bytes go through aiohttp: its connector pools the connections (and resolves, connects with a deadline,
speaks TLS), its response protocol parses the answer with the C parser and streams the body through a
StreamReader with flow control. The relay writes the request head itself, from a prefix built once per
endpoint: ClientSession.request spent more CPU per request than the rest of the relay together, building
what a relay never uses (cookie jar, redirect loop, tracing, payload objects, request and response
wrappers). `make bench`, 1 KB chat at c=64: 92 -> 58 us of relay CPU per request.

This leans on parts of aiohttp that its documentation barely covers: `connector.connect()` takes a
ClientRequest (one is built per endpoint and stands for its address), and a connection's ResponseHandler
is given its parser with `set_response_params()`, yields `(message, payload)` from `read()`, and tells
through `should_close`, `closed` and `abort()` whether it can be reused, when it is gone, and how to drop
it. pyproject.toml pins the aiohttp minor version for that reason; tests/test_upstream_call.py exercises
each of them.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import weakref

import aiohttp
import aiohttp.abc
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_parser import RawResponseMessage
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from relay.config import Settings
from relay.headers import Header
from relay.retry import Retrier

_SMALL_BODY = 64 * 1024  # a request body this small leaves in one write: the kernel takes it at once


class Slots:
    """At most `cap` upstream requests in flight (None: no cap); waiters are admitted in FIFO order.

    `take()` takes a free slot at once; when it cannot, `await wait()` waits for one and gives the seconds
    spent waiting. Either way `give_back()` returns it. Without a cap nothing is awaited at all. The counts
    are plain numbers: the metrics sample them (Metrics.flush).
    """

    def __init__(self, cap: int | None) -> None:
        self._semaphore = asyncio.Semaphore(cap) if cap else None
        self.in_flight = 0
        self.waiting = 0

    def take(self) -> bool:
        if self._semaphore is None:
            self.in_flight += 1
            return True
        return False  # acquire() is a coroutine even when a slot is free: wait() takes it

    async def wait(self) -> float:
        semaphore = self._semaphore
        assert semaphore is not None
        if not semaphore.locked():
            await semaphore.acquire()  # a free slot: acquire() returns without suspending
            self.in_flight += 1
            return 0.0
        started = time.perf_counter()
        self.waiting += 1
        try:
            await semaphore.acquire()
        finally:
            self.waiting -= 1
        self.in_flight += 1
        return time.perf_counter() - started

    def give_back(self) -> None:
        self.in_flight -= 1
        if self._semaphore is not None:
            self._semaphore.release()


class Response:
    """An upstream answer: its status and headers, and its body as aiohttp streams it (`content`).
    End it with `release()` once the body is read (the connection goes back to the pool if the upstream
    keeps it alive) or `close()` (the connection is dropped: nothing more is read from it)."""

    __slots__ = ("status", "headers", "raw_headers", "content", "_connection", "_closed", "_reusable")

    def __init__(
        self,
        connection: aiohttp.connector.Connection,
        message: RawResponseMessage,
        payload: StreamReader,
        request_bytes: int,
    ) -> None:
        self.status: int = message.code
        self.headers: CIMultiDictProxy[str] = message.headers
        self.raw_headers: tuple[Header, ...] = message.raw_headers
        self.content = payload
        self._connection = connection
        # An answer other than success to a big request may have come before the upstream read all of it
        # (413, 401): the rest would stand in front of the next request on this connection. (What is still
        # unsent cannot be seen under TLS, where the socket's buffer is the TLS layer's.)
        self._reusable = 200 <= self.status < 300 or request_bytes <= _SMALL_BODY
        # aiohttp 3.14 leaves a body waiting forever when the connection breaks on a malformed chunk (the
        # parser fails the connection, not the body): the body fails here once the connection is gone.
        protocol = connection.protocol
        self._closed = protocol.closed if protocol is not None else None
        if self._closed is not None:
            self._closed.add_done_callback(self._connection_lost)

    def release(self) -> None:
        if not self._reusable:
            self.close()
            return
        self._stop_watching()
        self._connection.release()  # the connector closes it instead if the body was not read to its end

    def close(self) -> None:
        self._stop_watching()
        _drop(self._connection)

    def _stop_watching(self) -> None:
        if self._closed is not None:
            self._closed.remove_done_callback(self._connection_lost)
            self._closed = None

    def _connection_lost(self, closed: asyncio.Future[None]) -> None:
        if not self.content.is_eof() and self.content.exception() is None:
            self.content.set_exception(aiohttp.ClientPayloadError("the upstream connection closed in the middle of the body"))


class Upstream:
    def __init__(
        self,
        settings: Settings,
        resolver: aiohttp.abc.AbstractResolver | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        self.tls = tls
        self.base_url = settings.openai_base_url.rstrip("/")
        self.slots = Slots(settings.max_concurrent_requests)
        self.retrier = Retrier(settings.retry)
        self._connector: aiohttp.TCPConnector | None = None
        self.handed_out: weakref.WeakSet[ResponseHandler] = weakref.WeakSet()  # connections used before

    @property
    def connector(self) -> aiohttp.TCPConnector:
        if self._connector is None:
            raise RuntimeError("the upstream connection pool is opened by the app's lifespan")
        return self._connector

    def endpoint(self, path: str) -> Endpoint:
        return Endpoint(self, URL(self.base_url + path, encoded=True))

    async def open(self) -> None:
        self._connector = aiohttp.TCPConnector(
            limit=0,  # the relay caps concurrency itself, with slots
            keepalive_timeout=self.settings.upstream_keepalive_seconds,
            resolver=self.resolver,  # None: aiohttp's default; tests pass one that fails
            ssl=self.tls or True,  # True: the system's trusted CAs; tests pass a context that trusts theirs
        )

    async def close(self) -> None:
        if self._connector is not None:
            await self._connector.close()
            self._connector = None


class Endpoint:
    """POST to one URL of the upstream: `connection = await endpoint.connect()`, then
    `await endpoint.send(connection, query, headers, body)` -> Response (which owns the connection)."""

    def __init__(self, upstream: Upstream, url: URL) -> None:
        settings = upstream.settings
        self.upstream = upstream
        self.url = url
        self._path = url.raw_path.encode()
        self._fixed = f"Host: {url.host_port_subcomponent}\r\nAuthorization: Bearer {settings.openai_api_key}\r\n".encode()
        # Headers the client may override by sending its own value (it cannot send a Content-Type of its
        # own: the proxy checks and drops it). Lower-case name -> the line, as configured.
        overridable = CIMultiDict({"Content-Type": "application/json"})
        overridable.update(settings.openai_default_headers)
        self._defaults = {name.lower().encode(): f"{name}: {value}\r\n".encode() for name, value in overridable.items()}
        self._default_block = b"".join(self._defaults.values())
        self._timeout = aiohttp.ClientTimeout(total=None, connect=settings.connect_timeout)
        self._address: aiohttp.ClientRequest | None = None  # what connector.connect() keys its pool on

    async def connect(self) -> aiohttp.connector.Connection:
        """A connection to the upstream: a pooled one that is clean, or a new one."""
        if self._address is None:
            self._address = aiohttp.ClientRequest("POST", self.url, loop=asyncio.get_running_loop())
        handed_out = self.upstream.handed_out
        while True:
            try:
                connection = await self.upstream.connector.connect(self._address, [], self._timeout)
            except TimeoutError as exc:  # what ClientSession turns it into too
                raise aiohttp.ConnectionTimeoutError(f"Connection timeout to host {self.url}") from exc
            protocol = connection.protocol
            if protocol is None:
                return connection  # send() reports it
            if protocol not in handed_out:
                handed_out.add(protocol)
                closed = protocol.closed  # Response watches it; it lives as long as the connection, pooled or not
                if closed is not None:
                    closed.add_done_callback(_retrieve)  # so its error, if any, is always retrieved
                return connection  # a new one: whatever the upstream sent first, send()'s parser reports
            if not protocol.should_close:
                return connection
            # The upstream wrote on it while it sat in the pool (an unsolicited 408, a late answer):
            # read from it, the next request would get that instead of its own answer.
            _drop(connection)

    async def send(
        self, connection: aiohttp.connector.Connection, query: bytes, headers: list[Header], body: bytes
    ) -> Response:
        """Send the request, wait for the answer's head. The client's `headers` are lower-case pairs."""
        try:
            protocol = connection.protocol
            transport = connection.transport
            if protocol is None or transport is None or transport.is_closing():
                raise aiohttp.ClientConnectionResetError("the upstream connection closed before the request")
            protocol.set_response_params(read_until_eof=True, auto_decompress=False)
            transport.writelines((self._head(query, headers, len(body)), body))
            message, payload = await _final_answer(protocol)
        except BaseException:
            _drop(connection)
            raise
        return Response(connection, message, payload, len(body))

    def _head(self, query: bytes, headers: list[Header], length: int) -> bytes:
        target = self._path + b"?" + query if query else self._path
        defaults = self._default_block
        if headers:
            sent = {name for name, _ in headers}
            if not sent.isdisjoint(self._defaults):  # the client's own value wins over a configured default
                defaults = b"".join(line for name, line in self._defaults.items() if name not in sent)
        return b"".join(
            (b"POST ", target, b" HTTP/1.1\r\n", self._fixed, defaults,
             *[name + b": " + value + b"\r\n" for name, value in headers],
             b"Content-Length: %d\r\n\r\n" % length)  # fmt: skip
        )


def _drop(connection: aiohttp.connector.Connection) -> None:
    """Close a connection now: a graceful close would wait for the upstream to read what is still unsent."""
    if connection.protocol is not None:
        connection.protocol.abort()
    connection.close()


def _retrieve(closed: asyncio.Future[None]) -> None:
    if not closed.cancelled():
        closed.exception()  # the body's own error is what reaches the client


async def _final_answer(protocol: ResponseHandler) -> tuple[RawResponseMessage, StreamReader]:
    """The response head after any informational (1xx) ones, as ClientResponse.start reads it."""
    while True:
        message, payload = await protocol.read()
        if not 100 <= message.code < 200 or message.code == 101:
            return message, payload
