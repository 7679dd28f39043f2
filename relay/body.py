"""The only two changes the relay makes to a request body: the model, and the extra_body defaults."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import orjson

# orjson reads an integer beyond 64 bits as a float, silently (a 128-bit seed would change value), and
# writes such a float with an exponent ("e+"). The slow, exact standard-library path runs only when both
# signs are there: an "e+" in the output and a 19-digit run in the input.
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
    patched = orjson.dumps(request)
    if b"e+" in patched and _LONG_DIGIT_RUN in raw.translate(_DIGITS_ONLY):
        return _patch_exactly(raw, model, extra_body, reason="")
    return patched


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
    if not isinstance(request, dict):
        raise InvalidBody(f"the request body must be a JSON object, not {_json_type(request)}")
    _apply(request, model, extra_body)
    try:
        return json.dumps(request, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:  # a number too large for a double, such as 1e400
        raise InvalidBody("the request body has a number out of range") from None


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
