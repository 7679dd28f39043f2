"""The x-fake-* request headers parsed into ``_Directives``, and the wire plan: exactly which bytes to
write for one request, with which delays, and how to leave the connection afterwards."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from relay.testing.bodies import _success
from relay.testing.canned import _Canned, _error
from relay.testing.recorded import Ending, Recorded

_DEFAULT_EVENTS = 20
_MAX_SIZE = 256 * 1024 * 1024  # a typo in a directive must not take the test machine down

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


def _compose(canned: _Canned, directives: _Directives, request_id: bytes, keep_alive: bool) -> _Wire:
    close = not keep_alive or directives.fault == "close-after-response"
    head = b"".join(
        (
            _without(canned.head, directives.extra) if directives.extra else canned.head,
            b"openai-processing-ms: %d\r\nx-request-id: req_%b\r\n" % (directives.delay * 1000, request_id),
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


def _without(head: bytes, extra: bytes) -> bytes:
    """A canned head less the lines whose header x-fake-headers sets: its value replaces theirs (a test
    that says `x-ratelimit-remaining-requests: 0` must not also send the canned 9999)."""
    names = {line.split(b":", 1)[0].lower() for line in extra.split(b"\r\n") if line}
    lines = head.split(b"\r\n")
    return b"\r\n".join(line for index, line in enumerate(lines) if index == 0 or line.split(b":", 1)[0].lower() not in names)


def _plan(request: Recorded, request_id: bytes, keep_alive: bool) -> _Wire:
    try:
        directives = _directives(request.headers)
    except _BadDirective as exc:
        return _compose(_error(400, str(exc)), _NO_DIRECTIVES, request_id, keep_alive)
    return _compose(_canned_for(request, directives), directives, request_id, keep_alive)
