"""The relay core: the ASGI endpoint behind POST /v1/chat/completions and POST /v1/responses.

One request: read the body (bounded), patch model and extra_body, take a concurrency slot, post to the
same path under the upstream base URL, then relay status, headers and body chunks as they arrive. The
response bytes are never inspected, so SSE, JSON and gzip all pass through the same loop. The client's
disconnect becomes cancellation, which closes the upstream connection and frees the slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

import aiohttp
from starlette.types import Receive, Scope, Send
from yarl import URL

from relay.body import InvalidBody, Patcher
from relay.client import Upstream
from relay.config import Settings
from relay.headers import client_response_headers, upstream_request_headers
from relay.observe import Exchange, Observer
from relay.protocol import CLIENT_KEY, ClientConnection
from relay.replies import send_error

log = logging.getLogger("relay")

_CLOSE = ((b"connection", b"close"),)
_STOPPED_READING = "client stopped reading"


class _ClientGone(Exception):
    pass


class _TooLarge(Exception):
    pass


class Failure(NamedTuple):
    status: int
    code: str
    kind: str  # the metrics label
    message: str


class Proxy:
    def __init__(self, upstream: Upstream, path: str, patcher: Patcher, observer: Observer | None) -> None:
        settings = upstream.settings
        self.upstream = upstream
        self.patch = patcher
        self.url = upstream.url(path)
        self.path = f"/v1{path}"
        self.observer = observer
        self.max_body = settings.max_request_bytes
        self.body_timeout = settings.request_body_timeout
        self.write_timeout = settings.client_write_timeout
        self.timing_header = settings.timing_header
        self.log_bodies = settings.log_bodies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = Exchange(self.path, time.perf_counter())
        try:
            await self._handle(scope, receive, send, exchange)
        finally:
            if self.observer is not None:
                self.observer.finish(exchange)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, exchange: Exchange) -> None:
        client: ClientConnection | None = scope.get(CLIENT_KEY)  # None unless relay.protocol serves it
        headers = scope["headers"]
        length, content_type = _framing(headers)
        if content_type is not None and content_type.split(b";", 1)[0].strip().lower() != b"application/json":
            exchange.status = 415
            await send_error(send, 415, "Content-Type must be application/json", code="unsupported_media_type")
            return
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            # Closing the connection is what spares the relay from reading the rest of the body.
            await self._too_large(send, exchange)
            return
        # A body that has all arrived (most do, with the head) needs no deadline.
        deadline = None if client is not None and client.body_complete else self.body_timeout
        try:
            raw = await _read_body(receive, self.max_body, deadline)
        except _ClientGone:
            return
        except _TooLarge:
            await self._too_large(send, exchange)
            return
        except TimeoutError:
            # A client that trickles its body (slowloris) would hold a connection and a task forever.
            exchange.status = 408
            message = f"the request body did not arrive within request_body_timeout ({self.body_timeout} s)"
            await send_error(send, 408, message, code="request_timeout", headers=_CLOSE)
            return
        exchange.bytes_in = len(raw)
        try:
            body = await self.patch(raw)
        except InvalidBody as exc:
            exchange.status = 400
            await send_error(send, 400, str(exc), code="invalid_json")
            return
        if self.log_bodies:
            log.debug("request body to %s: %s", self.path, _redact(body.decode("utf-8", "replace"), self.upstream.settings))
        url = self.url
        if scope["query_string"]:
            url = URL(f"{url}?{scope['query_string'].decode('latin-1')}", encoded=True)
        self.upstream.retrier.admit()
        forwarded = upstream_request_headers(headers)
        await self._exchange_until_disconnect(receive, send, url, body, forwarded, exchange, client)

    async def _too_large(self, send: Send, exchange: Exchange) -> None:
        exchange.status = 413
        message = f"the request body is larger than max_request_bytes ({self.max_body} bytes)"
        await send_error(send, 413, message, code="request_too_large", headers=_CLOSE)

    async def _exchange_until_disconnect(
        self,
        receive: Receive,
        send: Send,
        url: URL,
        body: bytes,
        headers: list[tuple[str, str]],
        exchange: Exchange,
        client: ClientConnection | None,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        abandon = _Abandon(task)
        stop_watching = _watch_disconnect(client, receive, abandon)
        try:
            await self._exchange(send, url, body, headers, exchange, abandon)
        except asyncio.CancelledError:
            if abandon.reason is None or task.uncancel() > 0:
                raise  # cancelled by someone else (shutdown): not ours to swallow
            exchange.client_gone = True
            if exchange.status == 0:
                exchange.status = 499  # nginx's "client closed request": nothing was sent
            if abandon.reason == _STOPPED_READING and client is not None:
                # uvicorn's close would wait for the client to read what is buffered: it never will.
                client.abort()
            log.debug("%s on %s; upstream request cancelled", abandon.reason, self.path)
        finally:
            # No await stands between the last send and here, so the watcher cannot mistake the
            # completed response (which uvicorn reports as http.disconnect) for a client that left.
            stop_watching()

    async def _exchange(
        self, send: Send, url: URL, body: bytes, headers: list[tuple[str, str]], exchange: Exchange, abandon: _Abandon
    ) -> None:
        upstream = self.upstream
        while True:
            async with upstream.slots as waited:
                exchange.slot_wait += waited
                exchange.attempts += 1
                sent = time.perf_counter()
                try:
                    response = await upstream.session.post(url, data=body, headers=headers, allow_redirects=False)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    failure = classify(exc, upstream.settings)
                    self._failed(exchange, failure.kind)
                    delay = upstream.retrier.after_error(exc, exchange.attempts - 1, exchange.started)
                    if delay is None:
                        await self._upstream_failed(send, failure, exc, exchange)
                        return
                    reason = failure.kind
                else:
                    exchange.error = None  # an earlier attempt's failure is not this answer's
                    exchange.ttfb = time.perf_counter() - sent
                    exchange.upstream_status = response.status
                    try:
                        delay = upstream.retrier.after_status(
                            response.status, response.headers, exchange.attempts - 1, exchange.started
                        )
                    except BaseException:
                        response.close()
                        raise
                    if delay is None:
                        await self._relay(response, send, exchange, abandon)
                        return
                    response.close()  # the retried answer is discarded; its connection is not worth draining
                    reason = str(response.status)
            if self.observer is not None:
                self.observer.retrying(reason)
            log.info("retrying %s in %.2f s (attempt %d: %s)", self.path, delay, exchange.attempts, reason)
            await asyncio.sleep(delay)

    async def _relay(
        self, response: aiohttp.ClientResponse, send: Send, exchange: Exchange, abandon: _Abandon
    ) -> None:
        headers = client_response_headers(response.raw_headers)
        if self.timing_header:
            headers.append((b"server-timing", _server_timing(exchange)))
        exchange.request_id = response.headers.get("x-request-id")
        exchange.status = response.status
        watchdog = _WriteWatchdog(self.write_timeout, exchange, abandon) if self.write_timeout else None
        try:
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            await _relay_body(response.content, send, exchange, watchdog)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Returning without the final body message makes uvicorn close the client's connection:
            # the client sees a truncated body, never a clean end of a partial one.
            response.close()
            self._failed(exchange, "mid_body")
            log.warning("upstream failed mid-body on %s: %s; client connection aborted", self.path, _describe(exc))
        except BaseException:
            response.close()  # close, not release: release would drain or pool a half-read connection
            raise
        else:
            response.release()
        finally:
            if watchdog is not None:
                watchdog.stop()

    def _failed(self, exchange: Exchange, kind: str) -> None:
        exchange.error = kind
        if self.observer is not None:
            self.observer.upstream_failed(kind)

    async def _upstream_failed(self, send: Send, failure: Failure, exc: BaseException, exchange: Exchange) -> None:
        exchange.status = failure.status
        log.warning("upstream error on %s -> %d: %s (%s)", self.path, failure.status, failure.message, _describe(exc))
        await send_error(send, failure.status, failure.message, type="upstream_error", code=failure.code)


def classify(exc: BaseException, settings: Settings) -> Failure:
    """The one place that decides what an upstream failure before the response means for the client."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        message = f"could not connect to the upstream within connect_timeout ({settings.connect_timeout} s)"
        return Failure(504, "upstream_timeout", "connect_timeout", message)
    if isinstance(exc, aiohttp.SocketTimeoutError):
        message = f"the upstream sent nothing for read_timeout ({settings.read_timeout} s)"
        return Failure(504, "upstream_timeout", "read_timeout", message)
    if isinstance(exc, TimeoutError):
        message = f"the upstream did not finish within total_timeout ({settings.total_timeout} s)"
        return Failure(504, "upstream_timeout", "total_timeout", message)
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        message = f"cannot resolve the upstream host {exc.host}: {exc.os_error.strerror or exc.os_error}"
        return Failure(502, "upstream_unreachable", "dns", message)
    if isinstance(exc, aiohttp.ClientConnectorError):
        message = f"cannot connect to the upstream {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}"
        return Failure(502, "upstream_unreachable", "refused", message)
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientConnectionResetError)):
        return Failure(502, "upstream_disconnected", "reset", "the upstream closed the connection before answering")
    return Failure(502, "bad_upstream_response", "bad_response", "the upstream's answer could not be read as HTTP")


def _framing(headers: list[tuple[bytes, bytes]]) -> tuple[bytes | None, bytes | None]:
    length = content_type = None
    for name, value in headers:
        if name == b"content-length":
            length = value
        elif name == b"content-type":
            content_type = value
    return length, content_type


async def _read_body(receive: Receive, limit: int, timeout: float | None) -> bytes:
    if timeout is None:
        return await _read_chunks(receive, limit)
    async with asyncio.timeout(timeout):
        return await _read_chunks(receive, limit)


async def _read_chunks(receive: Receive, limit: int) -> bytes:
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        if not message.get("more_body", False):
            if not chunks:
                return chunk
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


async def _relay_body(
    content: aiohttp.StreamReader, send: Send, exchange: Exchange, watchdog: _WriteWatchdog | None
) -> None:
    """Send each chunk as soon as aiohttp has it: no re-chunking, no line splitting, no buffering."""
    while True:
        chunk = await content.readany()
        last = not chunk or content.at_eof()
        if watchdog is not None:
            watchdog.sending = True
        await send({"type": "http.response.body", "body": chunk, "more_body": not last})
        exchange.bytes_out += len(chunk)
        if last:
            return
        if watchdog is not None:
            watchdog.sending = False
            watchdog.arm()


class _Abandon:
    """Cancels the request's task, once, and remembers why: the relay's own reasons to give up on it."""

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.reason: str | None = None

    def __call__(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.task.cancel()

    def client_left(self) -> None:
        self("client disconnected")


def _watch_disconnect(client: ClientConnection | None, receive: Receive, abandon: _Abandon) -> Callable[[], None]:
    """Abandon the request when its client disconnects; returns what stops the watch."""
    if client is not None:
        client.watch(abandon.client_left)  # relay.protocol calls it from connection_lost
        return client.unwatch
    # Under plain uvicorn only a pending receive() hears of the disconnect, so a task waits in one.
    watcher = asyncio.get_running_loop().create_task(_abandon_on_disconnect(receive, abandon))
    return watcher.cancel


async def _abandon_on_disconnect(receive: Receive, abandon: _Abandon) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    abandon.client_left()


class _WriteWatchdog:
    """Gives up on a client when one send to it has not finished for between one and two `timeout`s.

    uvicorn's send waits for the client's socket to drain, without limit; a client that stopped reading
    would otherwise hold its concurrency slot and its upstream connection forever.
    """

    def __init__(self, timeout: float, exchange: Exchange, abandon: _Abandon) -> None:
        self.sending = False
        self._exchange = exchange
        self._stuck_at: int | None = None  # bytes relayed when a check last found a send waiting
        self._timeout = timeout
        self._abandon = abandon
        self._timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        """Start watching, from the second send on: uvicorn's send waits only for a drain that an
        earlier write left pending, so a one-chunk answer (most non-stream ones) never needs a timer."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._timeout, self._check)

    def _check(self) -> None:
        relayed = self._exchange.bytes_out
        if self.sending and self._stuck_at == relayed:
            # A send was waiting at the last check and no byte got through since: a whole period.
            self._abandon(_STOPPED_READING)
            return
        self._stuck_at = relayed if self.sending else None
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _server_timing(exchange: Exchange) -> bytes:
    before = (time.perf_counter() - exchange.started - (exchange.ttfb or 0.0)) * 1000
    upstream = (exchange.ttfb or 0.0) * 1000
    return f"relay;dur={before:.2f}, upstream;dur={upstream:.2f}".encode()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _redact(text: str, settings: Settings) -> str:
    return text.replace(settings.openai_api_key, "[redacted]")
