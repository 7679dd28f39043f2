"""The relay core: the ASGI endpoint behind POST /v1/chat/completions and POST /v1/responses.

One request: read the body (bounded), patch model and extra_body, take a concurrency slot, post to the
same path under the upstream base URL, then relay status, headers and body chunks as they arrive. The
response bytes are never inspected, so SSE, JSON and gzip all pass through the same loop. A watcher task
turns the client's disconnect into cancellation, which closes the upstream connection and frees the slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import NamedTuple

import aiohttp
from starlette.types import Receive, Scope, Send
from yarl import URL

from relay.body import InvalidBody, Patcher
from relay.client import Upstream
from relay.config import Settings
from relay.headers import client_response_headers, upstream_request_headers
from relay.observe import Exchange, Observer
from relay.replies import send_error

log = logging.getLogger("relay")

_CLOSE = ((b"connection", b"close"),)


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
        try:
            async with asyncio.timeout(self.body_timeout):
                raw = await _read_body(receive, self.max_body)
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
        await self._exchange_until_disconnect(receive, send, url, body, upstream_request_headers(headers), exchange)

    async def _too_large(self, send: Send, exchange: Exchange) -> None:
        exchange.status = 413
        message = f"the request body is larger than max_request_bytes ({self.max_body} bytes)"
        await send_error(send, 413, message, code="request_too_large", headers=_CLOSE)

    async def _exchange_until_disconnect(
        self, receive: Receive, send: Send, url: URL, body: bytes, headers: list[tuple[str, str]], exchange: Exchange
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(_cancel_on_disconnect(receive, task))
        try:
            await self._exchange(send, url, body, headers, exchange)
        except asyncio.CancelledError:
            if not watcher.done() or task.uncancel() > 0:
                raise  # cancelled by someone else (shutdown): not ours to swallow
            log.debug("client disconnected; upstream request to %s cancelled", url.path)
        finally:
            # No await stands between the last send and here, so the watcher cannot mistake the
            # completed response (which uvicorn reports as http.disconnect) for a client that left.
            watcher.cancel()

    async def _exchange(
        self, send: Send, url: URL, body: bytes, headers: list[tuple[str, str]], exchange: Exchange
    ) -> None:
        upstream = self.upstream
        stale_connection_retried = False
        while True:
            async with upstream.slots as waited:
                exchange.slot_wait += waited
                exchange.attempts += 1
                sent = time.perf_counter()
                try:
                    response = await upstream.session.post(url, data=body, headers=headers, allow_redirects=False)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    if isinstance(exc, aiohttp.ClientConnectionResetError) and not stale_connection_retried:
                        # The request could not be written: a pooled connection died just before use.
                        # Nothing reached the upstream, so this one retry is safe even for a POST.
                        stale_connection_retried = True
                        continue
                    failure = classify(exc, upstream.settings)
                    exchange.error = failure.kind
                    delay = upstream.retrier.after_error(exc, exchange.attempts - 1, exchange.started)
                    if delay is None:
                        await self._upstream_failed(send, failure, exc, exchange)
                        return
                else:
                    exchange.error = None  # an earlier attempt's failure is not this answer's
                    exchange.ttfb = time.perf_counter() - sent
                    exchange.upstream_status = response.status
                    delay = upstream.retrier.after_status(
                        response.status, response.headers, exchange.attempts - 1, exchange.started
                    )
                    if delay is None:
                        await self._relay(response, send, exchange)
                        return
                    response.close()  # the retried answer is discarded; its connection is not worth draining
            log.info("retrying %s in %.2f s (attempt %d failed: %s)", self.path, delay, exchange.attempts,
                     exchange.error or exchange.upstream_status)
            await asyncio.sleep(delay)

    async def _relay(self, response: aiohttp.ClientResponse, send: Send, exchange: Exchange) -> None:
        headers = client_response_headers(response.raw_headers)
        if self.timing_header:
            headers.append((b"server-timing", _server_timing(exchange)))
        exchange.request_id = response.headers.get("x-request-id")
        exchange.status = response.status
        try:
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            exchange.bytes_out = await _relay_body(response.content, send)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Returning without the final body message makes uvicorn close the client's connection:
            # the client sees a truncated body, never a clean end of a partial one.
            response.close()
            exchange.error = "mid_body"
            log.warning("upstream failed mid-body on %s: %s; client connection aborted", self.path, _describe(exc))
        except BaseException:
            response.close()  # close, not release: release would drain or pool a half-read connection
            raise
        else:
            response.release()

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


async def _read_body(receive: Receive, limit: int) -> bytes:
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


async def _relay_body(content: aiohttp.StreamReader, send: Send) -> int:
    """Send each chunk as soon as aiohttp has it: no re-chunking, no line splitting, no buffering."""
    relayed = 0
    while True:
        chunk = await content.readany()
        relayed += len(chunk)
        if not chunk or content.at_eof():
            await send({"type": "http.response.body", "body": chunk, "more_body": False})
            return relayed
        await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Task[object]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    task.cancel()


def _server_timing(exchange: Exchange) -> bytes:
    before = (time.perf_counter() - exchange.started - (exchange.ttfb or 0.0)) * 1000
    upstream = (exchange.ttfb or 0.0) * 1000
    return f"relay;dur={before:.2f}, upstream;dur={upstream:.2f}".encode()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _redact(text: str, settings: Settings) -> str:
    return text.replace(settings.openai_api_key, "[redacted]")
