"""The relay core: the ASGI endpoint behind POST /v1/chat/completions and POST /v1/responses.

One request: read the body (bounded), patch model and extra_body, take a concurrency slot, post to the
same path under the upstream base URL, then relay status, headers and body chunks as they arrive. The
response bytes are never inspected, so SSE, JSON and gzip all pass through the same loop. A watcher task
turns the client's disconnect into cancellation, which closes the upstream connection and frees the slot.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from starlette.types import Receive, Scope, Send
from yarl import URL

from relay.body import InvalidBody, patch
from relay.client import Upstream
from relay.headers import client_response_headers, upstream_request_headers
from relay.replies import send_error

log = logging.getLogger("relay")

_CLOSE = ((b"connection", b"close"),)


class _ClientGone(Exception):
    pass


class _TooLarge(Exception):
    pass


class Proxy:
    def __init__(self, upstream: Upstream, path: str) -> None:
        settings = upstream.settings
        self.upstream = upstream
        self.url = upstream.url(path)
        self.model = settings.openai_model
        self.extra_body = settings.extra_body
        self.max_body = settings.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = scope["headers"]
        length, content_type = _framing(headers)
        if content_type is not None and content_type.split(b";", 1)[0].strip().lower() != b"application/json":
            await send_error(send, 415, "Content-Type must be application/json", code="unsupported_media_type")
            return
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            # Closing the connection is what spares the relay from reading the rest of the body.
            await self._too_large(send)
            return
        try:
            raw = await _read_body(receive, self.max_body)
        except _ClientGone:
            return
        except _TooLarge:
            await self._too_large(send)
            return
        try:
            body = patch(raw, self.model, self.extra_body)
        except InvalidBody as exc:
            await send_error(send, 400, str(exc), code="invalid_json")
            return
        url = self.url
        if scope["query_string"]:
            url = URL(f"{url}?{scope['query_string'].decode('latin-1')}", encoded=True)
        await self._exchange_until_disconnect(receive, send, url, body, upstream_request_headers(headers))

    async def _too_large(self, send: Send) -> None:
        message = f"the request body is larger than max_request_bytes ({self.max_body} bytes)"
        await send_error(send, 413, message, code="request_too_large", headers=_CLOSE)

    async def _exchange_until_disconnect(
        self, receive: Receive, send: Send, url: URL, body: bytes, headers: list[tuple[str, str]]
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(_cancel_on_disconnect(receive, task))
        try:
            await self._exchange(send, url, body, headers)
        except asyncio.CancelledError:
            if not watcher.done() or task.uncancel() > 0:
                raise  # cancelled by someone else (shutdown): not ours to swallow
            log.debug("client disconnected; upstream request to %s cancelled", url.path)
        finally:
            # No await stands between the last send and here, so the watcher cannot mistake the
            # completed response (which uvicorn reports as http.disconnect) for a client that left.
            watcher.cancel()

    async def _exchange(self, send: Send, url: URL, body: bytes, headers: list[tuple[str, str]]) -> None:
        async with self.upstream.slots:
            try:
                response = await self.upstream.session.post(url, data=body, headers=headers, allow_redirects=False)
            except (aiohttp.ClientError, TimeoutError) as exc:
                await self._upstream_failed(send, exc)
                return
            try:
                await send(
                    {
                        "type": "http.response.start",
                        "status": response.status,
                        "headers": client_response_headers(response.raw_headers),
                    }
                )
                await _relay_body(response.content, send)
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Returning without the final body message makes uvicorn close the client's connection:
                # the client sees a truncated body, never a clean end of a partial one.
                response.close()
                log.warning("upstream failed mid-body on %s: %s; client connection aborted", url.path, _describe(exc))
            except BaseException:
                response.close()  # close, not release: release would drain or pool a half-read connection
                raise
            else:
                response.release()

    async def _upstream_failed(self, send: Send, exc: BaseException) -> None:
        """The one place that turns an upstream failure before the response into the client's error."""
        settings = self.upstream.settings
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            status, code = 504, "upstream_timeout"
            message = f"could not connect to the upstream within connect_timeout ({settings.connect_timeout} s)"
        elif isinstance(exc, aiohttp.SocketTimeoutError):
            status, code = 504, "upstream_timeout"
            message = f"the upstream sent nothing for read_timeout ({settings.read_timeout} s)"
        elif isinstance(exc, TimeoutError):
            status, code = 504, "upstream_timeout"
            message = f"the upstream did not finish within total_timeout ({settings.total_timeout} s)"
        elif isinstance(exc, aiohttp.ClientConnectorError):
            status, code = 502, "upstream_unreachable"
            message = f"cannot connect to the upstream {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}"
        elif isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
            status, code = 502, "upstream_disconnected"
            message = "the upstream closed the connection before answering"
        else:
            status, code = 502, "bad_upstream_response"
            message = "the upstream's answer could not be read as HTTP"
        log.warning("upstream error -> %d: %s (%s)", status, message, _describe(exc))
        await send_error(send, status, message, type="upstream_error", code=code)


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


async def _relay_body(content: aiohttp.StreamReader, send: Send) -> None:
    """Send each chunk as soon as aiohttp has it: no re-chunking, no line splitting, no buffering."""
    while True:
        chunk = await content.readany()
        if not chunk or content.at_eof():
            await send({"type": "http.response.body", "body": chunk, "more_body": False})
            return
        await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Task[object]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    task.cancel()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
