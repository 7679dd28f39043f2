"""Canned response bytes: a status line and headers plus the body parts that follow, built once and
cached per (endpoint, stream, events, size, ...); HTTP/1.1 chunk framing; OpenAI-shaped error bodies.

What the bodies say (chat completions, Responses objects, their SSE streams) is in relay.testing.bodies.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson

_CACHE_MAX_ENTRIES = 512
_CACHE_MAX_BYTES = 4 * 1024 * 1024  # huge one-off bodies are rebuilt rather than pinned in memory

_RATE_LIMIT_HEADERS = b"x-ratelimit-limit-requests: 10000\r\nx-ratelimit-remaining-requests: 9999\r\n"
_CHUNK_END = b"0\r\n\r\n"


@dataclass(frozen=True, slots=True)
class _Canned:
    head: bytes  # status line plus the headers that depend only on the body
    parts: tuple[bytes, ...]  # what follows the head on the wire; chunk-framed when streaming
    streaming: bool


_cache: dict[tuple[Any, ...], _Canned] = {}


def _cached(key: tuple[Any, ...], build: Callable[[], _Canned]) -> _Canned:
    canned = _cache.get(key)
    if canned is None:
        canned = build()
        if sum(map(len, canned.parts)) <= _CACHE_MAX_BYTES:
            # Model names come from clients, so the key space is open-ended; start over rather than grow.
            if len(_cache) >= _CACHE_MAX_ENTRIES:
                _cache.clear()
            _cache[key] = canned
    return canned


@functools.cache
def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("ascii")


def _frame(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _json_canned(status: int, payload: Any, gzipped: bool) -> _Canned:
    body = orjson.dumps(payload)
    encoding = b""
    if gzipped:
        body = gzip.compress(body, mtime=0)
        encoding = b"content-encoding: gzip\r\n"
    head = b"%bcontent-type: application/json\r\ncontent-length: %d\r\n%b%b" % (
        _status_line(status),
        len(body),
        encoding,
        _RATE_LIMIT_HEADERS,
    )
    return _Canned(head, (body,), streaming=False)


def _sse_canned(events: list[bytes]) -> _Canned:
    # Repeated events are one shared object; framing each object once keeps a stream of
    # N events of 8 MiB at a few copies of 8 MiB in memory instead of N.
    framed: dict[int, bytes] = {}
    for event in events:
        if id(event) not in framed:
            framed[id(event)] = _frame(event)
    parts = [framed[id(event)] for event in events]
    parts[-1] += _CHUNK_END  # the last event is always unique, so appending cannot touch a shared part
    head = (
        _status_line(200)
        + b"content-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n"
        + _RATE_LIMIT_HEADERS
    )
    return _Canned(head, tuple(parts), streaming=True)


_ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "unknown_url"),
    429: ("requests", "rate_limit_exceeded"),
}


def _error(status: int, message: str, gzipped: bool = False) -> _Canned:
    def build() -> _Canned:
        kind, code = _ERROR_KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
        payload = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        return _json_canned(status, payload, gzipped)

    return _cached(("error", status, message, gzipped), build)
