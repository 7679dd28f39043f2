"""One client connection to the fake upstream: an ``asyncio.Protocol`` that parses requests with
httptools and answers them in order, by the wire plan or through a test's custom handler."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from relay.testing.canned import _error
from relay.testing.directives import _NO_DIRECTIVES, _compose, _plan, _Wire
from relay.testing.recorded import Ending, Handler, Recorded
from relay.testing.responder import Responder

if TYPE_CHECKING:
    from relay.testing.server import FakeUpstream

log = logging.getLogger(__name__)


class _Exchange:
    """One request on a connection, from fully read until answered (or abandoned)."""

    __slots__ = ("request", "keep_alive", "epoch", "custom", "task", "done")

    def __init__(self, request: Recorded, keep_alive: bool, epoch: int) -> None:
        self.request = request
        self.keep_alive = keep_alive
        self.epoch = epoch
        self.custom = False
        self.task: asyncio.Task[None] | None = None
        self.done = False


class _Connection(asyncio.Protocol):
    def __init__(self, upstream: FakeUpstream, loop: asyncio.AbstractEventLoop) -> None:
        self._upstream = upstream
        self._loop = loop
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._queue: deque[_Exchange] = deque()
        self._current: _Exchange | None = None
        self._pumping = False
        self._closed_locally = False
        self._writable: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] = loop.create_future()
        # Set by the last answer's x-fake-idle-close-ms / close-when-reused; act once the connection is idle.
        self._idle_close: float | None = None
        self._close_when_reused = False
        self._idle_timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # SSE events are small separate writes; Nagle would hold them back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._upstream._connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._disarm_idle()
        if self._close_when_reused and self._current is None and not self._queue:
            # The keep-alive race, made deterministic: the server gave up on the connection just as the
            # client reused it, so the request is never read, let alone answered.
            self._upstream.unread_closes += 1
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            # Our own bug surfaced through the parser; make it visible instead of a bogus 400.
            log.exception("fake upstream failed while answering")
            self.abort()
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            if self._current is None:
                wire = _compose(_error(400, "Malformed HTTP request"), _NO_DIRECTIVES, b"0", keep_alive=False)
                self.transport.write(wire.chunks[0])
            self.close()

    def pause_writing(self) -> None:
        self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        self._wake_writers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._upstream._connections.discard(self)
        self._disarm_idle()
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake_writers()
        self._queue.clear()
        exchange = self._current
        if exchange is None or exchange.done:
            return
        # A request from before the last reset() belongs to an earlier test; its late cancel is not news.
        if not self._closed_locally and exchange.epoch == self._upstream._epoch:
            self._upstream.disconnects += 1
        self._finish(exchange)
        # A custom handler keeps running so it can observe `closed`; our own plans just stop.
        if exchange.task is not None and not exchange.custom:
            exchange.task.cancel()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode("ascii")
        request = Recorded(method, self._url.decode("latin-1"), self._headers, b"".join(self._body))
        if self._upstream.record:
            self._upstream.requests.append(request)
        self._queue.append(_Exchange(request, self._parser.should_keep_alive(), self._upstream._epoch))
        self._pump()

    # answering

    @property
    def transport(self) -> asyncio.Transport:
        assert self._transport is not None
        return self._transport

    def _pump(self) -> None:
        # A synchronous answer finishes inside this loop and re-enters here; the outer loop
        # then takes the next queued request, so pipelined requests cannot recurse deeply.
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._current is None and self._queue and not self.transport.is_closing():
                self._answer(self._queue.popleft())
        finally:
            self._pumping = False

    def _answer(self, exchange: _Exchange) -> None:
        self._current = exchange
        upstream = self._upstream
        upstream._began()
        handler = upstream.handler
        if handler is not None:
            exchange.custom = True
            exchange.task = upstream._spawn(self._serve_custom(exchange, handler))
            return
        wire = _plan(exchange.request, upstream._next_request_id(), exchange.keep_alive)
        self._idle_close, self._close_when_reused = wire.idle_close, wire.close_when_reused
        if wire.delay or wire.gap:
            exchange.task = upstream._spawn(self._play(exchange, wire))
        else:
            # The common case needs no task at all, which is most of this server's speed.
            for chunk in wire.chunks:
                self.transport.write(chunk)
            self._end(exchange, wire.ending)

    async def _play(self, exchange: _Exchange, wire: _Wire) -> None:
        await asyncio.sleep(wire.delay)
        for index, chunk in enumerate(wire.chunks):
            if index >= 2 and wire.gap:
                await asyncio.sleep(wire.gap)
            await self.send(chunk)
        self._end(exchange, wire.ending)

    async def _serve_custom(self, exchange: _Exchange, handler: Handler) -> None:
        responder = Responder(self)
        try:
            await handler(exchange.request, responder)
        except Exception:
            log.exception("fake upstream handler failed for %s %s", exchange.request.method, exchange.request.path)
            if responder.started:
                # Half a response cannot be repaired; cutting it off is the honest signal.
                self._end(exchange, "abort")
                return
            wire = _compose(_error(500, "Fake upstream handler failed"), _NO_DIRECTIVES, b"0", exchange.keep_alive)
            await self.send(wire.chunks[0])
            self._end(exchange, wire.ending)
            return
        self._end(exchange, "finish" if exchange.keep_alive else "close")

    def _end(self, exchange: _Exchange, ending: Ending) -> None:
        if ending == "hang":
            return
        self._finish(exchange)
        if ending == "abort":
            self.abort()
        elif ending == "close":
            self.close()
        else:
            self._pump()
            self._arm_idle()

    def _arm_idle(self) -> None:
        """Like uvicorn's keep-alive timeout: a connection idle for `_idle_close` seconds is closed."""
        idle = self._current is None and not self._queue and not self.transport.is_closing()
        if idle and self._idle_close is not None and self._idle_timer is None:
            self._idle_timer = self._loop.call_later(self._idle_close, self._close_idle)

    def _disarm_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _close_idle(self) -> None:
        self._idle_timer = None
        self._upstream.idle_closes += 1
        self.close()

    def _finish(self, exchange: _Exchange) -> None:
        if exchange.done:
            return
        exchange.done = True
        if self._current is exchange:
            self._current = None
        self._upstream.in_flight -= 1

    # used by Responder and FakeUpstream

    async def send(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        self.transport.write(data)
        if self._writable is not None:
            await self._writable

    def _wake_writers(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def abort(self) -> None:
        self._closed_locally = True
        self.transport.abort()

    def close(self) -> None:
        self._closed_locally = True
        self.transport.close()
