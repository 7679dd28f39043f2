"""A fast fake OpenAI-compatible upstream for the tests, the benchmark and the demo mode.

It answers ``POST .../chat/completions`` and ``POST .../responses`` with realistic,
byte-for-byte deterministic JSON or SSE bodies, so bytes fetched through the relay can
be compared with bytes fetched from here directly. It has to be much faster than the
relay it measures, hence a bare ``asyncio.Protocol`` over httptools with canned bodies
cached per (endpoint, stream, events, size, ...) instead of a web framework.

Behaviour is driven by request headers, which a relay forwards end to end:

``x-fake-events: N``            SSE events per stream (default 20)
``x-fake-delay-ms: F``          wait before the response headers (model "think" time)
``x-fake-event-delay-ms: F``    wait between SSE events
``x-fake-size: BYTES``          approximate JSON body size, or content size of each SSE event
``x-fake-status: CODE``         answer CODE with an OpenAI error body
``x-fake-headers: {json}``      extra response headers, for any response
``x-fake-gzip: 1``              gzip a JSON body (mtime 0, so still deterministic)
``x-fake-fault: NAME``          reset-before-headers, hang, reset-mid-body, reset-mid-stream,
                                stall-mid-stream, close-after-response or close-when-reused
                                (answer, keep the connection, then close it unread as soon as
                                the next request arrives on it: the keep-alive race)
``x-fake-idle-close-ms: F``     after answering, close the kept-alive connection once it has been
                                idle F ms (what uvicorn does after its timeout_keep_alive, 5 s)

Tests can instead install ``FakeUpstream.handler`` and write each response themselves
through a ``Responder``. ``UpstreamThread`` runs the server on its own loop for sync code.

CLI: ``python -m bench.upstream --host 127.0.0.1 --port 9000 [--record]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gzip
import ipaddress
import itertools
import logging
import math
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal, cast

import httptools
import orjson

log = logging.getLogger(__name__)

# Constant ids and timestamps keep bodies identical across runs and across the relay.
_CREATED = 1_700_000_000
_CHAT_ID = "chatcmpl-fakeB9MBs8CjcvOU2jLn4n570S5qMJKcT"
_RESPONSE_ID = "resp_fake67ccd2bed1ec8190b14f964abc0542670bb6a6b452"
_MESSAGE_ID = "msg_fake67ccd2bf17f0819081ff3bb2cf6508e60bb6a6b452"
_FINGERPRINT = "fp_fake0c7ffe"
_DEFAULT_MODEL = "gpt-4o-mini"
_PROMPT_TOKENS = 12
# ASCII without JSON escapes, so each character of content adds exactly one body byte.
_LOREM = "The quick brown fox jumps over the lazy dog while the relay forwards every byte. "

_DEFAULT_EVENTS = 20
_DEFAULT_JSON_SIZE = 1024
_DEFAULT_EVENT_SIZE = 4  # roughly one token per delta, like a real stream
_MAX_SIZE = 256 * 1024 * 1024  # a typo in a directive must not take the test machine down
_CACHE_MAX_ENTRIES = 512
_CACHE_MAX_BYTES = 4 * 1024 * 1024  # huge one-off bodies are rebuilt rather than pinned in memory

_RATE_LIMIT_HEADERS = b"x-ratelimit-limit-requests: 10000\r\nx-ratelimit-remaining-requests: 9999\r\n"
_CHUNK_END = b"0\r\n\r\n"

Ending = Literal["finish", "close", "abort", "hang"]
Handler = Callable[["Recorded", "Responder"], Awaitable[None]]


@dataclass(slots=True)
class Recorded:
    """One request as received."""

    method: str
    path: str  # with the query string, as received
    headers: list[tuple[str, str]]  # lower-cased names, in order, latin-1 decoded
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)

    def json(self) -> Any:
        return orjson.loads(self.body)


# --- canned bodies ---------------------------------------------------------------------


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


def _text(size: int) -> str:
    return (_LOREM * (size // len(_LOREM) + 1))[:size]


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _sized(build: Callable[[str], Any], size: int) -> Any:
    """Fill the content of ``build(text)`` so that its JSON is about ``size`` bytes."""
    overhead = len(orjson.dumps(build("")))
    return build(_text(max(0, size - overhead)))


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


def _chat_completion(model: str, text: str) -> dict[str, Any]:
    tokens = _tokens(text)
    return {
        "id": _CHAT_ID,
        "object": "chat.completion",
        "created": _CREATED,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": _PROMPT_TOKENS,
            "completion_tokens": tokens,
            "total_tokens": _PROMPT_TOKENS + tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": _FINGERPRINT,
    }


def _chat_chunk(model: str, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
    chunk = {
        "id": _CHAT_ID,
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": _FINGERPRINT,
        "choices": choices,
        "usage": usage,
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _chat_stream(model: str, events: int, size: int, include_usage: bool) -> _Canned:
    text = _text(size)

    def event(first: bool, last: bool) -> bytes:
        # Every event carries the full payload, so one event can be made as large as asked.
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": "stop" if last else None}
        return _chat_chunk(model, [choice])

    middle = event(False, False)
    stream = [event(i == 0, i == events - 1) if i in (0, events - 1) else middle for i in range(events)]
    if include_usage:
        tokens = _tokens(text) * events
        usage = {"prompt_tokens": _PROMPT_TOKENS, "completion_tokens": tokens, "total_tokens": _PROMPT_TOKENS + tokens}
        stream.append(_chat_chunk(model, [], usage))
    stream.append(b"data: [DONE]\n\n")
    return _sse_canned(stream)


def _message(text: str, status: str) -> dict[str, Any]:
    return {
        "id": _MESSAGE_ID,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _response(model: str, text: str | None) -> dict[str, Any]:
    """A Responses API object: completed when ``text`` is given, freshly created otherwise."""
    usage = None
    if text is not None:
        tokens = _tokens(text)
        usage = {
            "input_tokens": _PROMPT_TOKENS,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": _PROMPT_TOKENS + tokens,
        }
    return {
        "id": _RESPONSE_ID,
        "object": "response",
        "created_at": _CREATED,
        "status": "in_progress" if text is None else "completed",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": model,
        "output": [] if text is None else [_message(text, "completed")],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": {},
    }


def _responses_stream(model: str, deltas: int, size: int) -> _Canned:
    text = _text(size)
    full = text * deltas
    where = {"item_id": _MESSAGE_ID, "output_index": 0, "content_index": 0}
    empty_part = {"type": "output_text", "text": "", "annotations": []}
    payloads: list[dict[str, Any]] = [
        {"type": "response.created", "response": _response(model, None)},
        {"type": "response.in_progress", "response": _response(model, None)},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**_message("", "in_progress"), "content": []},
        },
        {"type": "response.content_part.added", **where, "part": empty_part},
        *({"type": "response.output_text.delta", **where, "delta": text, "logprobs": []} for _ in range(deltas)),
        {"type": "response.output_text.done", **where, "text": full, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": {**empty_part, "text": full}},
        {"type": "response.output_item.done", "output_index": 0, "item": _message(full, "completed")},
        {"type": "response.completed", "response": _response(model, full)},
    ]
    events = [
        b"event: %b\ndata: %b\n\n" % (payload["type"].encode(), orjson.dumps({**payload, "sequence_number": number}))
        for number, payload in enumerate(payloads)
    ]
    return _sse_canned(events)


def _success(path: str, body: dict[str, Any], events: int, size: int | None, gzipped: bool) -> _Canned:
    model = body.get("model")
    if not isinstance(model, str):
        model = _DEFAULT_MODEL
    chat = path.endswith("/chat/completions")
    if body.get("stream") is not True:
        build = _chat_completion if chat else _response
        size = _DEFAULT_JSON_SIZE if size is None else size
        return _cached(
            ("json", chat, model, size, gzipped),
            lambda: _json_canned(200, _sized(functools.partial(build, model), size), gzipped),
        )
    size = _DEFAULT_EVENT_SIZE if size is None else size
    if not chat:
        return _cached(("responses-sse", model, events, size), lambda: _responses_stream(model, events, size))
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return _cached(
        ("chat-sse", model, events, size, include_usage), lambda: _chat_stream(model, events, size, include_usage)
    )


# --- directives ------------------------------------------------------------------------

_FAULTS = frozenset(
    {
        "reset-before-headers",
        "hang",
        "reset-mid-body",
        "reset-mid-stream",
        "stall-mid-stream",
        "close-after-response",
        "close-when-reused",
    }
)


@dataclass(frozen=True, slots=True)
class _Directives:
    events: int = _DEFAULT_EVENTS
    size: int | None = None
    delay: float = 0.0  # seconds
    gap: float = 0.0  # seconds
    status: int = 200
    gzip: bool = False
    fault: str | None = None
    extra: bytes = b""  # ready-made header lines
    idle_close: float | None = None  # seconds


_NO_DIRECTIVES = _Directives()


class _BadDirective(ValueError):
    pass


def _bounded_int(low: int, high: int, value: str) -> int:
    number = int(value)
    if not low <= number <= high:
        raise ValueError(f"{number} is outside {low}..{high}")
    return number


def _seconds(value: str) -> float:
    millis = float(value)
    if not (math.isfinite(millis) and millis >= 0):
        raise ValueError("expected a finite number of milliseconds >= 0")
    return millis / 1000


def _flag(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise ValueError("expected 1 or 0")


def _fault(value: str) -> str:
    if value not in _FAULTS:
        raise ValueError(f"expected one of {', '.join(sorted(_FAULTS))}")
    return value


def _header_lines(value: str) -> bytes:
    headers = orjson.loads(value)
    if not isinstance(headers, dict):
        raise ValueError("expected a JSON object")
    lines = []
    for name, raw in headers.items():
        text = raw if isinstance(raw, str) else orjson.dumps(raw).decode()
        # Refuse anything that could smuggle extra header lines or break the head.
        if not name or any(c in name for c in ":\r\n \t") or any(c in text for c in "\r\n"):
            raise ValueError(f"unusable header {name!r}")
        lines.append(f"{name}: {text}\r\n".encode("latin-1"))
    return b"".join(lines)


_DIRECTIVES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "x-fake-events": ("events", functools.partial(_bounded_int, 0, 10_000_000)),
    "x-fake-size": ("size", functools.partial(_bounded_int, 0, _MAX_SIZE)),
    "x-fake-delay-ms": ("delay", _seconds),
    "x-fake-event-delay-ms": ("gap", _seconds),
    "x-fake-status": ("status", functools.partial(_bounded_int, 200, 599)),
    "x-fake-gzip": ("gzip", _flag),
    "x-fake-fault": ("fault", _fault),
    "x-fake-headers": ("extra", _header_lines),
    "x-fake-idle-close-ms": ("idle_close", _seconds),
}


def _directives(headers: Iterable[tuple[str, str]]) -> _Directives:
    found: dict[str, Any] = {}
    for name, value in headers:
        if not name.startswith("x-fake-"):
            continue
        # An unknown or malformed directive is a bug in the caller; a loud 400 beats a silent default.
        if name not in _DIRECTIVES:
            raise _BadDirective(f"unknown directive header {name}")
        field, parse = _DIRECTIVES[name]
        try:
            found[field] = parse(value.strip())
        except ValueError as exc:
            raise _BadDirective(f"bad {name} {value!r}: {exc}") from exc
    return _Directives(**found) if found else _NO_DIRECTIVES


def _canned_for(request: Recorded, directives: _Directives) -> _Canned:
    path = request.path.partition("?")[0]
    if not path.endswith(("/chat/completions", "/responses")):
        return _error(404, f"Invalid URL ({request.method} {path})", directives.gzip)
    if request.method != "POST":
        return _error(405, f"Method {request.method} not allowed for {path}", directives.gzip)
    if directives.status != 200:
        return _error(directives.status, f"Fake upstream error {directives.status}", directives.gzip)
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        return _error(400, "We could not parse the JSON body of your request.", directives.gzip)
    return _success(path, body, directives.events, directives.size, directives.gzip)


# --- wire plan -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Wire:
    """Exactly what to put on the socket for one request, and how to leave it afterwards."""

    chunks: list[bytes]  # chunks[0] is the head, each later chunk one SSE event (or the JSON body)
    ending: Ending
    delay: float = 0.0
    gap: float = 0.0
    # What happens to the connection once it is idle after this answer (see _Connection._arm_idle).
    idle_close: float | None = None
    close_when_reused: bool = False


def _compose(canned: _Canned, directives: _Directives, request_id: int, keep_alive: bool) -> _Wire:
    close = not keep_alive or directives.fault == "close-after-response"
    head = b"".join(
        (
            canned.head,
            b"openai-processing-ms: %d\r\nx-request-id: req_%d\r\n" % (directives.delay * 1000, request_id),
            directives.extra,
            b"connection: close\r\n" if close else b"",
            b"\r\n",
        )
    )
    match directives.fault:
        case "reset-before-headers":
            return _Wire([], "abort", directives.delay)
        case "hang":
            return _Wire([], "hang")
        case "reset-mid-body":
            body = b"".join(canned.parts)
            return _Wire([head, body[: len(body) // 2]], "abort", directives.delay)
        case "reset-mid-stream" | "stall-mid-stream":
            half = canned.parts[: len(canned.parts) // 2]
            cut: Ending = "abort" if directives.fault == "reset-mid-stream" else "hang"
            return _Wire([head, *half], cut, directives.delay, directives.gap)
    ending: Ending = "close" if close else "finish"
    idle = (directives.idle_close, directives.fault == "close-when-reused")
    if not canned.streaming:
        # One write per JSON answer: the syscall, not the copy, is what costs at high rates.
        return _Wire([head + canned.parts[0]], ending, directives.delay, 0.0, *idle)
    return _Wire([head, *canned.parts], ending, directives.delay, directives.gap, *idle)


def _plan(request: Recorded, request_id: int, keep_alive: bool) -> _Wire:
    try:
        directives = _directives(request.headers)
    except _BadDirective as exc:
        return _compose(_error(400, str(exc)), _NO_DIRECTIVES, request_id, keep_alive)
    return _compose(_canned_for(request, directives), directives, request_id, keep_alive)


# --- server ----------------------------------------------------------------------------


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
                wire = _compose(_error(400, "Malformed HTTP request"), _NO_DIRECTIVES, 0, keep_alive=False)
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
            wire = _compose(_error(500, "Fake upstream handler failed"), _NO_DIRECTIVES, 0, exchange.keep_alive)
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


class Responder:
    """What a custom handler writes one response with."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.started = False

    @property
    def closed(self) -> asyncio.Future[None]:
        """Resolves when the connection is gone, whoever closed it."""
        return self._connection.closed

    async def start(self, status: int = 200, headers: Sequence[tuple[str, str]] = ()) -> None:
        """Write the status line and exactly these headers; framing is the handler's choice."""
        self.started = True
        lines = [_status_line(status), *(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers), b"\r\n"]
        await self.write(b"".join(lines))

    async def write(self, data: bytes) -> None:
        """Write raw bytes; a no-op once the connection is gone."""
        await self._connection.send(data)

    async def chunk(self, data: bytes) -> None:
        """Write one HTTP/1.1 chunk (an empty one would end the body, so it is skipped)."""
        if data:
            await self.write(_frame(data))

    async def end_chunks(self) -> None:
        await self.write(_CHUNK_END)

    def abort(self) -> None:
        self._connection.abort()

    async def wait(self, event: threading.Event, timeout: float = 10.0) -> bool:
        """Wait for a test thread to set ``event`` without blocking this loop; False on timeout."""
        if event.is_set():
            return True
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[bool] = loop.create_future()

        def settle(result: bool) -> None:
            if not outcome.done():  # the handler may have been cancelled meanwhile
                outcome.set_result(result)

        def block() -> None:
            result = event.wait(timeout)
            with contextlib.suppress(RuntimeError):  # the loop may be closed by now
                loop.call_soon_threadsafe(settle, result)

        # A thread per wait rather than the default executor: its few workers would make
        # many concurrently waiting handlers queue behind each other, and they are not daemons.
        threading.Thread(target=block, name="fake-upstream-wait", daemon=True).start()
        return await outcome

    async def wait_closed(self, timeout: float = 10.0) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            return False
        return True


class FakeUpstream:
    """The server. State is mutated only on its loop; other threads may read it."""

    def __init__(self, record: bool = True) -> None:
        self.record = record
        self.requests: list[Recorded] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.disconnects = 0
        self.idle_closes = 0  # kept-alive connections closed after x-fake-idle-close-ms of idleness
        self.unread_closes = 0  # connections closed unread on a new request (close-when-reused)
        self.handler: Handler | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._request_ids = itertools.count(1)
        self._epoch = 0

    def reset(self) -> None:
        """Forget requests, counters and the handler. ``in_flight`` is a live gauge and stays."""
        self._epoch += 1
        self.requests.clear()
        self.max_in_flight = self.in_flight
        self.disconnects = 0
        self.idle_closes = 0
        self.unread_closes = 0
        self.handler = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on a loopback address and return the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self, loop), _loopback(host), port, reuse_address=True, backlog=1024
        )
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in list(self._connections):
            connection.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    def _began(self) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _next_request_id(self) -> int:
        return next(self._request_ids)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        # The loop only keeps weak references to tasks; stop() also needs to find them.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _loopback(host: str) -> str:
    # "localhost" may resolve to both 127.0.0.1 and ::1, which with port 0 would give two ports.
    if host == "localhost":
        return "127.0.0.1"
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the fake upstream only binds loopback addresses, not {host!r}")
    return host


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class UpstreamThread:
    """A FakeUpstream on its own event loop in a daemon thread, for synchronous test code."""

    def __init__(self, record: bool = True) -> None:
        self.upstream = FakeUpstream(record)
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> UpstreamThread:
        ready = threading.Event()
        failures: list[BaseException] = []

        def run() -> None:
            loop = self._loop = _new_loop()
            try:
                self.port = loop.run_until_complete(self.upstream.start())
            except BaseException as exc:  # handed to the starting thread, which re-raises it
                failures.append(exc)
                loop.close()
                return
            finally:
                ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake upstream did not start within 10 s")
        if failures:
            self._thread = None
            raise failures[0]
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.upstream.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None

    def wait_for(self, predicate: Callable[[FakeUpstream], bool], timeout: float = 5.0) -> bool:
        """Poll ``predicate`` until it holds or ``timeout`` seconds pass; report which."""
        deadline = time.monotonic() + timeout
        while not predicate(self.upstream):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def __enter__(self) -> UpstreamThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --- CLI -------------------------------------------------------------------------------


async def _serve(host: str, port: int, record: bool) -> None:
    upstream = FakeUpstream(record)
    bound = await upstream.start(host, port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    address = _loopback(host)
    url_host = f"[{address}]" if ":" in address else address
    print(f"fake upstream listening on http://{url_host}:{bound}/v1", flush=True)
    await stopping.wait()
    await upstream.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000, help="port to bind, 0 for any free one (default 9000)")
    parser.add_argument(
        "--record",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="keep every request in memory (off by default so memory stays flat under load)",
    )
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        runner.run(_serve(args.host, args.port, args.record))


if __name__ == "__main__":
    main()
