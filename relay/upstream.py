"""One upstream server: its connection pool, and the POST of one relayed request to it.

Bytes go through aiohttp's connector (pool, DNS, TLS, connect deadline) and its response protocol (the C
parser, a StreamReader with flow control); the relay writes the request head itself, from a prefix built
once per endpoint. Every aiohttp call below its documented client API is in relay.seams.aiohttp_internals.
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from collections.abc import Callable

import aiohttp
import aiohttp.abc
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from relay.headers import NOT_FORWARDED_UPSTREAM, Header
from relay.seams import aiohttp_internals as seam
from relay.seams.aiohttp_internals import Connection, RawResponseMessage, ResponseHandler
from relay.settings import Settings

_SMALL_BODY = 64 * 1024  # a request body this small leaves in one write: the kernel takes it at once
# The exceptions an attempt at the upstream may end with, before its answer's head (relay.failures).
UPSTREAM_ERRORS = (aiohttp.ClientError, HttpProcessingError)


class Response:
    """An upstream answer: its status and headers, and its body as aiohttp streams it (`content`).
    End it with `release()` once the body is read (the connection goes back to the pool if the upstream
    keeps it alive) or `close()` (the connection is dropped: nothing more is read from it)."""

    __slots__ = ("status", "headers", "raw_headers", "content", "_connection", "_closed", "_reusable")

    def __init__(
        self, connection: Connection, message: RawResponseMessage, payload: aiohttp.StreamReader, request_bytes: int
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
        self._closed = seam.closed_future(protocol) if protocol is not None else None
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
        seam.drop(self._connection)

    def _stop_watching(self) -> None:
        if self._closed is not None:
            self._closed.remove_done_callback(self._connection_lost)
            self._closed = None

    def _connection_lost(self, closed: asyncio.Future[None]) -> None:
        seam.fail_body(self.content, "the upstream connection closed in the middle of the body")


class Upstream:
    """One base URL: one connection pool per process, and the endpoints under it."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        settings: Settings,
        resolver: aiohttp.abc.AbstractResolver | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`settings` gives what all upstreams share: default headers, connect timeout, pool keep-alive."""
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.default_headers = dict(settings.openai_default_headers)
        self.timeout = aiohttp.ClientTimeout(total=None, connect=settings.connect_timeout)
        self.keepalive_seconds = settings.upstream_keepalive_seconds
        self.resolver = resolver
        self.tls = tls
        url = URL(self.base_url)
        self.label = f"{url.host}:{url.explicit_port or url.port}"  # metrics and logs: never the key
        self._connector: aiohttp.TCPConnector | None = None
        # Connections handed out before: one of these coming from the pool again is a reused connection.
        self.used_connections: weakref.WeakSet[ResponseHandler] = weakref.WeakSet()

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
            keepalive_timeout=self.keepalive_seconds,
            resolver=self.resolver,  # None: aiohttp's default; tests pass one that fails
            ssl=self.tls or True,  # True: the system's trusted CAs; tests pass a context that trusts theirs
        )

    async def close(self) -> None:
        if self._connector is not None:
            await self._connector.close()
            self._connector = None


class Endpoint:
    """POST to one URL of the upstream: `await endpoint.post(query, headers, body, fresh, connected)` ->
    Response (which owns the connection)."""

    def __init__(self, upstream: Upstream, url: URL) -> None:
        self.upstream = upstream
        self.url = url
        self._path = url.raw_path.encode()
        self._fixed = f"Host: {url.host_port_subcomponent}\r\nAuthorization: Bearer {upstream.api_key}\r\n".encode()
        # Headers the client may override by sending its own value (it cannot send a Content-Type of its
        # own: the proxy checks and drops it). Lower-case name -> the line, as configured.
        overridable = CIMultiDict({"Content-Type": "application/json"})
        overridable.update(upstream.default_headers)
        self._defaults = {name.lower().encode(): f"{name}: {value}\r\n".encode() for name, value in overridable.items()}
        self._default_block = b"".join(self._defaults.values())
        # Only these can meet a client's header of the same name: the others never reach the head.
        self._overridable = frozenset(self._defaults) - NOT_FORWARDED_UPSTREAM
        self._key: aiohttp.ClientRequest | None = None  # what connector.connect() keys its pool on

    async def post(
        self, query: bytes, headers: list[Header], body: bytes, fresh: bool, connected: Callable[[], None]
    ) -> Response:
        """Send the request and wait for the answer's head; `connected()` is called once a connection is
        there (connect_timeout ends, read_timeout begins). The client's `headers` are lower-case pairs.
        Raises Unanswered when the attempt fails before the answer's head."""
        connection, reused = await self._connect(fresh)
        connected()
        # Sent here, not in a coroutine of its own: one frame less on each resumption of every request.
        try:
            protocol = connection.protocol
            transport = connection.transport
            if protocol is None or transport is None or transport.is_closing():
                raise NotSent("the upstream connection closed before the request was written")
            seam.expect_answer(protocol)
            transport.writelines((self._head(query, headers, len(body)), body))
            message, payload = await seam.final_answer(protocol)
        except BaseException as exc:
            seam.drop(connection)
            if isinstance(exc, UPSTREAM_ERRORS):
                raise Unanswered(exc, reused) from exc
            raise
        return Response(connection, message, payload, len(body))

    async def _connect(self, fresh: bool) -> tuple[Connection, bool]:
        """A connection to the upstream, and whether it was used before: a clean pooled one, or a new one.
        With `fresh`, a new one: the idle pooled ones it passes over are closed, since the upstream has
        just closed one of them and the rest are as old."""
        if self._key is None:
            self._key = seam.pool_key(self.url)
        used = self.upstream.used_connections
        while True:
            try:
                connection = await seam.take_connection(self.upstream.connector, self._key, self.upstream.timeout)
            except TimeoutError as exc:
                raise Unanswered(seam.connect_timeout(self._key), False) from exc
            except aiohttp.ClientError as exc:
                raise Unanswered(exc, False) from exc
            protocol = connection.protocol
            if protocol is None:
                return connection, False  # sending reports it
            if protocol not in used:
                used.add(protocol)
                closed = seam.closed_future(protocol)  # lives as long as the connection, pooled or not
                if closed is not None:
                    closed.add_done_callback(_retrieve)  # so its error, if any, is always retrieved
                return connection, False  # whatever the upstream sent first, the parser reports
            if not fresh and not seam.is_dirty(protocol):
                return connection, True
            # The upstream wrote on it while it sat in the pool (an unsolicited 408, a late answer), or a
            # new connection is wanted: the next request must not get what it holds.
            seam.drop(connection)

    def _head(self, query: bytes, headers: list[Header], length: int) -> bytes:
        target = self._path + b"?" + query if query else self._path
        defaults = self._default_block
        if headers and self._overridable:
            sent = {name for name, _ in headers}
            if not sent.isdisjoint(self._overridable):  # the client's own value wins over a configured default
                defaults = b"".join(line for name, line in self._defaults.items() if name not in sent)
        return b"".join(
            (b"POST ", target, b" HTTP/1.1\r\n", self._fixed, defaults,
             *[name + b": " + value + b"\r\n" for name, value in headers],
             b"Content-Length: %d\r\n\r\n" % length)  # fmt: skip
        )


class NotSent(aiohttp.ClientConnectionResetError):
    """The connection was gone before any byte of the request left: sending it again cannot duplicate it."""


class Unanswered(Exception):
    """An attempt that failed before the answer's head: what ended it, and whether the connection had
    been used before (the keep-alive race can only happen on one that had)."""

    def __init__(self, cause: BaseException, reused: bool) -> None:
        super().__init__(cause)
        self.cause = cause
        self.reused = reused


def _retrieve(closed: asyncio.Future[None]) -> None:
    if not closed.cancelled():
        closed.exception()  # the body's own error is what reaches the client
