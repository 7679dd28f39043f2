"""The only two changes the relay makes to a request body: the model, and the extra_body defaults."""

from __future__ import annotations

import asyncio
import ctypes
import json
import multiprocessing
import os
import signal
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import orjson

# orjson reads an integer beyond 64 bits as a float, silently (a 128-bit seed would change value), and
# writes such a float with an exponent ("e+"). The slow, exact standard-library path runs only when both
# signs are there: an "e+" in the output and a 19-digit run in the input. A "+" is looked for first: a
# one-byte search is a memchr, ten times faster than a search for "e+" over text full of e's.
_DIGITS_ONLY = bytes(48 if 48 <= b <= 57 else 32 for b in range(256))
_LONG_DIGIT_RUN = b"0" * 19


class InvalidBody(ValueError):
    """The request body is not a JSON object."""


def patch(raw: bytes, model: str, extra_body: Mapping[str, Any]) -> bytes:
    """Set `model`, add each extra_body key the request does not set (an explicit null counts as set)."""
    try:
        request = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _patch_exactly(raw, model, extra_body, reason=str(exc))
    if not isinstance(request, dict):
        raise InvalidBody(f"the request body must be a JSON object, not {_json_type(request)}")
    _apply(request, model, extra_body)
    try:
        patched = orjson.dumps(request)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (254 levels)
        return _patch_exactly(raw, model, extra_body, reason="")
    if b"+" in patched and b"e+" in patched and _LONG_DIGIT_RUN in raw.translate(_DIGITS_ONLY):
        return _patch_exactly(raw, model, extra_body, reason="")
    return patched


class Patcher:
    """Patches bodies for one process: inline, or in a helper process when they are big.

    Parsing and re-serialising megabytes holds the event loop (and, orjson being C that keeps the GIL,
    any thread) for tens of milliseconds, during which no other stream moves. Bodies of at least
    `offload_bytes` are patched in a helper process instead, started on first use:
    `await patcher.elsewhere(raw)` when `patcher.offloads(raw)`, else `patcher(raw)`.
    """

    def __init__(self, model: str, extra_body: Mapping[str, Any], offload_bytes: int | None) -> None:
        self.model = model
        self.extra_body = dict(extra_body)  # a plain dict travels to the helper process
        self.offload_bytes = offload_bytes
        self._pool: ProcessPoolExecutor | None = None

    def __call__(self, raw: bytes) -> bytes:
        return patch(raw, self.model, self.extra_body)

    def offloads(self, raw: bytes) -> bool:
        return self.offload_bytes is not None and len(raw) >= self.offload_bytes

    async def elsewhere(self, raw: bytes) -> bytes:
        if self._pool is None:
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(1, mp_context=context, initializer=_start_helper)
        pool = self._pool
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, patch, raw, self.model, self.extra_body)
        except BrokenProcessPool:
            # The helper died (killed, out of memory): patch this one here, and start a new helper next
            # time (unless a request that failed earlier already did).
            if self._pool is pool:
                self._pool = None
                pool.shutdown(wait=False)
            return self(raw)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _start_helper() -> None:
    """In the helper process: Ctrl-C and shutdown are the relay's to handle, and the helper must not
    outlive a relay that was killed outright (Linux: the kernel sends it SIGTERM then). It yields the CPU
    to the relay's event loop: where both share a core (a worker pinned, a container of one CPU), a big
    body's patch then slows that one request instead of every stream the loop is relaying."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(10)
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the helper then ends when the relay's pipe to it closes


def _apply(request: dict[str, Any], model: str, extra_body: Mapping[str, Any]) -> None:
    request["model"] = model
    for key, value in extra_body.items():
        request.setdefault(key, value)


def _patch_exactly(raw: bytes, model: str, extra_body: Mapping[str, Any], reason: str) -> bytes:
    """The standard library's path: big integers stay exact and lone surrogates survive as escapes."""
    try:
        request = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError):
        raise InvalidBody(f"the request body is not valid JSON: {reason}" if reason else "invalid JSON") from None
    except RecursionError:
        raise InvalidBody("the request body is nested too deeply") from None
    if not isinstance(request, dict):
        raise InvalidBody(f"the request body must be a JSON object, not {_json_type(request)}")
    _apply(request, model, extra_body)
    try:
        return json.dumps(request, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:  # a number too large for a double, such as 1e400
        raise InvalidBody("the request body has a number out of range") from None
    except RecursionError:
        raise InvalidBody("the request body is nested too deeply") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"
