"""A request's way in: read its body (bounded in size and time), check it, decompress and patch it.

`Intake.read` returns the patched body to forward, or None once the client has been answered with the
OpenAI-shaped error that says what was wrong (or has left).
"""

from __future__ import annotations

import asyncio
import logging
import zlib

from starlette.types import Receive, Scope, Send

from relay.affinity import ROLLOUT_KEY, from_cookies, new_session_cookie
from relay.body import InvalidBody
from relay.client_connection import CLIENT_KEY, ClientConnection
from relay.host_names import HostNames
from relay.metrics import refused
from relay.inflate import WINDOW_BITS, TooLarge, inflate
from relay.observe import RequestRecord
from relay.patcher import Patcher
from relay.replies import send_error

log = logging.getLogger("relay")

_CLOSE = ((b"connection", b"close"),)
_THREAD_BYTES = 256 * 1024  # compressed bodies this big are inflated off the event loop (zlib frees the GIL)


class _ClientGone(Exception):
    pass


class Intake:
    def __init__(
        self,
        path: str,
        patcher: Patcher,
        max_body: int,
        body_timeout: float | None,
        origins: HostNames | None,
        redact: tuple[str, ...] | None,
        affinity: bool = False,
        session_cookie: str | None = None,
    ) -> None:
        self.path = path
        self.patch = patcher
        self.max_body = max_body
        self.body_timeout = body_timeout
        self.origins = origins  # None: any Origin (allowed_hosts: "*")
        self.redact = redact  # with log_bodies: the keys, which never appear in a log line
        self.affinity = affinity  # find the conversation's key (several upstreams)
        self.session_cookie = session_cookie.encode() if session_cookie else None

    async def read(self, scope: Scope, receive: Receive, send: Send, record: RequestRecord) -> bytes | None:
        length, content_type, encoding, origin, session, cookies = _scan(scope["headers"])
        if origin is not None and self.origins is not None and not _same_site(origin, self.origins):
            # A browser sends Origin with a cross-site POST; a page must not spend the operator's key.
            refused("invalid_origin")
            return await self._refuse(send, record, 403, "requests from web pages of other origins are refused", "invalid_origin")
        if content_type is not None and content_type.split(b";", 1)[0].strip().lower() != b"application/json":
            return await self._refuse(send, record, 415, "Content-Type must be application/json", "unsupported_media_type")
        coding = None if encoding is None else encoding.strip().lower().decode("latin-1")
        if coding is not None and coding != "identity" and coding not in WINDOW_BITS:
            message = "Content-Encoding must be gzip, deflate or identity"
            return await self._refuse(send, record, 415, message, "unsupported_content_encoding")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            # Closing the connection is what spares the relay from reading the rest of the body.
            return await self._too_large(send, record)
        client: ClientConnection | None = scope.get(CLIENT_KEY)  # None unless relay.protocol serves it
        try:
            if client is not None and client.body_complete:
                raw = await _read_chunks(receive, self.max_body)  # all here (most are, with the head): no deadline
            else:
                raw = await _read_body(receive, self.max_body, self.body_timeout)
            record.bytes_in = len(raw)
            if coding in WINDOW_BITS:
                raw = await _inflate(raw, WINDOW_BITS[coding], self.max_body)
        except _ClientGone:
            record.status, record.client_gone = 499, True  # nginx's "client closed request"
            return None
        except TooLarge:
            return await self._too_large(send, record)
        except TimeoutError:
            # A client that trickles its body (slowloris) would hold a connection and a task forever.
            message = f"the request body did not arrive within request_body_timeout ({self.body_timeout} s)"
            return await self._refuse(send, record, 408, message, "request_timeout", _CLOSE)
        except zlib.error:
            return await self._refuse(send, record, 400, "the request body is not valid gzip or deflate data", "invalid_json")
        try:
            body, cache_key = await self.patch.patch_in_helper(raw) if self.patch.is_big(raw) else self.patch(raw)
        except InvalidBody as exc:
            return await self._refuse(send, record, 400, str(exc), "invalid_json")
        if self.affinity:
            self._conversation(record, session, cache_key, scope.get(ROLLOUT_KEY), cookies)
        if self.redact is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("request body to %s: %s", self.path, _redacted(body.decode("utf-8", "replace"), self.redact))
        return body

    def _conversation(
        self, record: RequestRecord, session: bytes | None, cache_key: str | None, rollout: str | None, cookies: bytes | None
    ) -> None:
        """The request's conversation key, in the order relay.affinity gives; a new session cookie when
        the relay hands out its own and the request named no key."""
        key = session or (cache_key.encode() if cache_key else None) or (rollout.encode() if rollout else None)
        if key is None and cookies is not None:
            key = from_cookies(cookies, self.session_cookie)
        if key is None and self.session_cookie is not None:
            key, record.set_cookie = new_session_cookie(self.session_cookie)
        record.affinity = key

    async def _too_large(self, send: Send, record: RequestRecord) -> None:
        message = f"the request body is larger than max_request_bytes ({self.max_body} bytes)"
        await self._refuse(send, record, 413, message, "request_too_large", _CLOSE)

    async def _refuse(
        self, send: Send, record: RequestRecord, status: int, message: str, code: str, headers: tuple = ()
    ) -> None:
        record.status = status
        await send_error(send, status, message, code=code, headers=headers)


_Scanned = tuple[bytes | None, bytes | None, bytes | None, bytes | None, bytes | None, bytes | None]


def _scan(headers: list[tuple[bytes, bytes]]) -> _Scanned:
    """The headers intake looks at, in one pass: framing, coding, Origin, and the conversation's key."""
    length = content_type = encoding = origin = session = cookies = None
    for name, value in headers:
        if name == b"content-length":
            length = value
        elif name == b"content-type":
            content_type = value
        elif name == b"content-encoding":
            encoding = value
        elif name == b"origin":
            origin = value
        elif name == b"x-session-id":
            session = value
        elif name == b"cookie":
            cookies = value if cookies is None else cookies + b"; " + value
    return length, content_type, encoding, origin, session, cookies


def _same_site(origin: bytes, names: HostNames) -> bool:
    """`Origin: scheme://host[:port]` naming an allowed host (`null`, an opaque origin, names none)."""
    scheme, separator, authority = origin.partition(b"://")
    return bool(separator) and names.allows(authority)


def _redacted(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "[redacted]")
    return text


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
            raise TooLarge
        if not message.get("more_body", False):
            if not chunks:
                return chunk
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


async def _inflate(raw: bytes, window_bits: int, limit: int) -> bytes:
    """The decompressed body, off the event loop when it is big; over `limit` bytes is TooLarge."""
    if len(raw) >= _THREAD_BYTES:
        return await asyncio.to_thread(inflate, raw, window_bits, limit)
    return inflate(raw, window_bits, limit)


