"""The relay core: the ASGI endpoint behind POST /v1/chat/completions and POST /v1/responses.

One request: read the body (bounded), patch model and extra_body, take a concurrency slot, post to the
same path under the upstream base URL, then relay status, headers and body chunks as they arrive. The
response bytes are never inspected, so SSE, JSON and gzip all pass through the same loop. Giving up on
a request (its client left or stopped reading, or the upstream went silent) is cancellation of its task,
which closes the upstream connection and frees the slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from starlette.types import Receive, Scope, Send

from relay.body import InvalidBody, Patcher
from relay.client import Response, Upstream
from relay.config import Settings
from relay.headers import Header, client_response_headers, upstream_request_headers
from relay.observe import Exchange, Observer
from relay.protocol import CLIENT_KEY, ClientConnection
from relay.replies import allow_header, send_error, send_not_allowed

log = logging.getLogger("relay")

_CLOSE = ((b"connection", b"close"),)
_ALLOW = allow_header(("POST",))

# What an exchange is waiting for, and so which of its deadlines runs (see _Watchdog).
_IDLE, _UPSTREAM, _CLIENT = 0, 1, 2
_CLIENT_LEFT = "client disconnected"
_STOPPED_READING = "client stopped reading"
_UPSTREAM_SILENT = "upstream silent"
_TOO_LONG = "total_timeout passed"


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
        self.endpoint = upstream.endpoint(path)
        self.path = f"/v1{path}"
        self.observer = observer
        self.max_body = settings.max_request_bytes
        self.body_timeout = settings.request_body_timeout
        self.deadlines = (None, settings.read_timeout, settings.client_write_timeout)  # by _IDLE, _UPSTREAM, _CLIENT
        self.total_timeout = settings.total_timeout
        self.check_every = min((s for s in (*self.deadlines, self.total_timeout) if s is not None), default=None)
        self.timed_out = {
            _UPSTREAM_SILENT: Failure(
                504, "upstream_timeout", "read_timeout", f"the upstream sent nothing for read_timeout ({settings.read_timeout} s)"
            ),
            _TOO_LONG: Failure(
                504, "upstream_timeout", "total_timeout", f"the upstream did not finish within total_timeout ({settings.total_timeout} s)"
            ),
        }
        self.timing_header = settings.timing_header
        self.log_bodies = settings.log_bodies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await send_not_allowed(scope, send, _ALLOW)
            return
        exchange = Exchange(self.path, time.perf_counter())
        try:
            body = await self._request_body(scope, receive, send, exchange)
            if body is not None:
                await self._forward(scope, receive, send, body, exchange)
        finally:
            if self.observer is not None:
                self.observer.finish(exchange)

    async def _request_body(self, scope: Scope, receive: Receive, send: Send, exchange: Exchange) -> bytes | None:
        """The patched body to forward, or None once the client has been answered (or has left)."""
        client: ClientConnection | None = scope.get(CLIENT_KEY)  # None unless relay.protocol serves it
        length, content_type = _framing(scope["headers"])
        if content_type is not None and content_type.split(b";", 1)[0].strip().lower() != b"application/json":
            exchange.status = 415
            await send_error(send, 415, "Content-Type must be application/json", code="unsupported_media_type")
            return None
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            # Closing the connection is what spares the relay from reading the rest of the body.
            await self._too_large(send, exchange)
            return None
        try:
            if client is not None and client.body_complete:
                raw = await _read_chunks(receive, self.max_body)  # all here (most are, with the head): no deadline
            else:
                raw = await _read_body(receive, self.max_body, self.body_timeout)
        except _ClientGone:
            return None
        except _TooLarge:
            await self._too_large(send, exchange)
            return None
        except TimeoutError:
            # A client that trickles its body (slowloris) would hold a connection and a task forever.
            exchange.status = 408
            message = f"the request body did not arrive within request_body_timeout ({self.body_timeout} s)"
            await send_error(send, 408, message, code="request_timeout", headers=_CLOSE)
            return None
        exchange.bytes_in = len(raw)
        try:
            body = await self.patch.elsewhere(raw) if self.patch.offloads(raw) else self.patch(raw)
        except InvalidBody as exc:
            exchange.status = 400
            await send_error(send, 400, str(exc), code="invalid_json")
            return None
        if self.log_bodies:
            log.debug("request body to %s: %s", self.path, _redact(body.decode("utf-8", "replace"), self.upstream.settings))
        return body

    async def _too_large(self, send: Send, exchange: Exchange) -> None:
        exchange.status = 413
        message = f"the request body is larger than max_request_bytes ({self.max_body} bytes)"
        await send_error(send, 413, message, code="request_too_large", headers=_CLOSE)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, body: bytes, exchange: Exchange) -> None:
        """Exchange with the upstream until the answer is relayed, or the watchdog gives up on it."""
        headers = upstream_request_headers(scope["headers"])
        self.upstream.retrier.admit()
        client: ClientConnection | None = scope.get(CLIENT_KEY)
        task = asyncio.current_task()
        assert task is not None
        watchdog = _Watchdog(task, self.deadlines, self.total_timeout, self.check_every)
        stop_watching = _watch_disconnect(client, receive, watchdog)
        try:
            await self._exchange(send, scope["query_string"], headers, body, exchange, watchdog)
        except asyncio.CancelledError:
            if watchdog.reason is None or task.uncancel() > 0:
                raise  # cancelled by someone else (shutdown): not ours to swallow
            await self._gave_up(watchdog, send, exchange, client)
        finally:
            # No await stands between the last send and here, so the watch cannot mistake the completed
            # response (which uvicorn reports as http.disconnect) for a client that left.
            stop_watching()
            watchdog.stop()

    async def _exchange(
        self, send: Send, query: bytes, headers: list[Header], body: bytes, exchange: Exchange, watchdog: _Watchdog
    ) -> None:
        upstream = self.upstream
        slots = upstream.slots
        while True:
            if not slots.take():
                exchange.slot_wait += await slots.wait()
            try:
                exchange.attempts += 1
                sent = time.perf_counter()
                try:
                    connection = await self.endpoint.connect()  # within connect_timeout, not read_timeout
                    watchdog.waiting(_UPSTREAM)
                    response = await self.endpoint.send(connection, query, headers, body)
                except (aiohttp.ClientError, HttpProcessingError) as exc:
                    watchdog.waiting(_IDLE)
                    failure = classify(exc, upstream.settings)
                    self._failed(exchange, failure.kind)
                    delay = upstream.retrier.after_error(exc, exchange.attempts - 1, exchange.started)
                    if delay is None:
                        await self._upstream_failed(send, failure, exchange, _describe(exc))
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
                        await self._relay(response, send, exchange, watchdog)
                        return
                    watchdog.waiting(_IDLE)
                    response.close()  # the retried answer is discarded; its connection is not worth draining
                    reason = str(response.status)
            finally:
                slots.give_back()
            if self.observer is not None:
                self.observer.retrying(reason)
            log.info("retrying %s in %.2f s (attempt %d: %s)", self.path, delay, exchange.attempts, reason)
            await asyncio.sleep(delay)

    async def _relay(self, response: Response, send: Send, exchange: Exchange, watchdog: _Watchdog) -> None:
        """Send each chunk as soon as aiohttp has it: no re-chunking, no line splitting, no buffering."""
        headers = client_response_headers(response.raw_headers)
        if self.timing_header:
            headers.append((b"server-timing", _server_timing(exchange)))
        exchange.request_id = response.headers.get("x-request-id")
        exchange.status = response.status
        content = response.content
        try:
            watchdog.waiting(_CLIENT)
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            while True:
                watchdog.waiting(_UPSTREAM)
                chunk = await content.readany()
                last = not chunk or content.at_eof()
                watchdog.waiting(_CLIENT)
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                exchange.bytes_out += len(chunk)
                if last:
                    break
        except aiohttp.ClientError as exc:
            # Returning without the final body message makes uvicorn close the client's connection:
            # the client sees a truncated body, never a clean end of a partial one.
            response.close()
            self._cut(exchange, _describe(exc))
        except BaseException:
            response.close()  # close, not release: release would drain or pool a half-read connection
            raise
        else:
            response.release()

    async def _gave_up(
        self, watchdog: _Watchdog, send: Send, exchange: Exchange, client: ClientConnection | None
    ) -> None:
        reason = watchdog.reason
        assert reason is not None
        timed_out = self.timed_out.get(reason)
        if timed_out is not None:
            if exchange.status == 0:
                self._failed(exchange, timed_out.kind)
                await self._upstream_failed(send, timed_out, exchange, timed_out.kind)
                return
            self._cut(exchange, timed_out.message)  # returning unfinished ends the client's connection, as above
        else:
            exchange.client_gone = True
            if exchange.status == 0:
                exchange.status = 499  # nginx's "client closed request": nothing was sent
            log.debug("%s on %s; upstream request cancelled", reason, self.path)
        if watchdog.phase == _CLIENT and client is not None:
            # Given up while a send to the client waited: uvicorn's close would wait for the client to read
            # what is buffered, and one that stopped reading never will.
            client.abort()

    def _cut(self, exchange: Exchange, cause: str) -> None:
        self._failed(exchange, "mid_body")
        log.warning("upstream failed mid-body on %s: %s; client connection aborted", self.path, cause)

    def _failed(self, exchange: Exchange, kind: str) -> None:
        exchange.error = kind
        if self.observer is not None:
            self.observer.upstream_failed(kind)

    async def _upstream_failed(self, send: Send, failure: Failure, exchange: Exchange, cause: str) -> None:
        exchange.status = failure.status
        log.warning("upstream error on %s -> %d: %s (%s)", self.path, failure.status, failure.message, cause)
        await send_error(send, failure.status, failure.message, type="upstream_error", code=failure.code)


def classify(exc: BaseException, settings: Settings) -> Failure:
    """The one place that decides what an upstream failure before the response means for the client."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        message = f"could not connect to the upstream within connect_timeout ({settings.connect_timeout} s)"
        return Failure(504, "upstream_timeout", "connect_timeout", message)
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


class _Watchdog:
    """Gives up on an exchange, once, by cancelling its task: when its client leaves, when the whole
    exchange outlasts total_timeout, or when what it waits for stalls: an upstream silent for read_timeout
    (its answer, or the next chunk), or a client that takes no byte for client_write_timeout (uvicorn's
    send waits for a full socket without limit).

    The proxy only notes what it waits for and since when; one timer per request compares that with
    the deadlines and re-arms itself. A timer rescheduled on every chunk, as aiohttp's sock_read does,
    costs more than relaying a small SSE event.
    """

    __slots__ = ("task", "reason", "phase", "since", "_deadlines", "_end", "_check_every", "_loop", "_now", "_timer")

    def __init__(
        self, task: asyncio.Task[object], deadlines: tuple[float | None, ...], total: float | None, check_every: float | None
    ) -> None:
        self.task = task
        self.reason: str | None = None
        self.phase = _IDLE
        self._deadlines = deadlines
        self._check_every = check_every  # the shortest deadline; None: there is none
        self._loop = task.get_loop()
        self._now = self._loop.time
        self.since = self._now()
        self._end = self.since + total if total is not None else None
        self._timer = self._loop.call_at(self.since + check_every, self._check) if check_every else None

    def waiting(self, phase: int) -> None:
        self.phase = phase
        self.since = self._now()

    def client_left(self) -> None:
        self._give_up(_CLIENT_LEFT)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _give_up(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.task.cancel()

    def _check(self) -> None:
        self._timer = None
        now = self._now()
        if self._end is not None and now >= self._end:
            self._give_up(_TOO_LONG)
            return
        deadline = self._deadlines[self.phase]
        if deadline is not None and now - self.since >= deadline:
            self._give_up(_STOPPED_READING if self.phase == _CLIENT else _UPSTREAM_SILENT)
            return
        # Not due yet. The wait may change to one with a shorter deadline before then, so look again
        # within the shortest one.
        wake = now + self._check_every
        if deadline is not None:
            wake = min(wake, self.since + deadline)
        if self._end is not None:
            wake = min(wake, self._end)
        self._timer = self._loop.call_at(wake, self._check)


def _watch_disconnect(client: ClientConnection | None, receive: Receive, watchdog: _Watchdog) -> Callable[[], None]:
    """Give up on the request when its client disconnects; returns what stops the watch."""
    if client is not None:
        client.watch(watchdog.client_left)  # relay.protocol calls it from connection_lost
        return client.unwatch
    # Under plain uvicorn only a pending receive() hears of the disconnect, so a task waits in one.
    watcher = asyncio.get_running_loop().create_task(_abandon_on_disconnect(receive, watchdog))
    return watcher.cancel


async def _abandon_on_disconnect(receive: Receive, watchdog: _Watchdog) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    watchdog.client_left()


def _server_timing(exchange: Exchange) -> bytes:
    before = (time.perf_counter() - exchange.started - (exchange.ttfb or 0.0)) * 1000
    upstream = (exchange.ttfb or 0.0) * 1000
    return f"relay;dur={before:.2f}, upstream;dur={upstream:.2f}".encode()


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # one log line, though aiohttp's parser errors span several
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _redact(text: str, settings: Settings) -> str:
    return text.replace(settings.openai_api_key, "[redacted]")
