"""What the relay changes in a request body, in one orjson pass: the model, the extra_body defaults, and
the optional rewrites an endpoint's Rules name. Everything else is kept as sent, big integers included."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Rules:
    """What one endpoint changes in its request bodies (plain data: it travels to the helper process)."""

    model: str
    defaults: Mapping[str, Any] = field(default_factory=dict)  # extra_body: added where the request has no such key
    drop_reasoning_items: bool = False  # Responses: `type: reasoning` items leave the `input` list
    stream_usage: bool = False  # chat: a stream asks for the usage chunk unless the client said otherwise
    cache_key: bool = False  # return the body's prompt_cache_key (a conversation key for relay.fleet)


def patch(raw: bytes, rules: Rules) -> tuple[bytes, str | None]:
    """Set `model`, add each default the request does not set (an explicit null counts as set), apply
    the endpoint's rewrites; and the body's prompt_cache_key when `rules.cache_key` asks for it."""
    try:
        request = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _patch_exactly(raw, rules, reason=str(exc))
    if not isinstance(request, dict):
        raise InvalidBody(f"the request body must be a JSON object, not {_json_type(request)}")
    key = _apply(request, rules)
    try:
        patched = orjson.dumps(request)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (254 levels)
        return _patch_exactly(raw, rules, reason="")
    if b"+" in patched and b"e+" in patched and _LONG_DIGIT_RUN in raw.translate(_DIGITS_ONLY):
        return _patch_exactly(raw, rules, reason="")
    return patched, key


def _apply(request: dict[str, Any], rules: Rules) -> str | None:
    request["model"] = rules.model
    for key, value in rules.defaults.items():
        request.setdefault(key, value)
    if rules.drop_reasoning_items:
        items = request.get("input")
        if isinstance(items, list):
            request["input"] = [item for item in items if not (isinstance(item, dict) and item.get("type") == "reasoning")]
    if rules.stream_usage and request.get("stream") is True:
        options = request.get("stream_options")
        if options is None:
            request["stream_options"] = {"include_usage": True}
        elif isinstance(options, dict):
            options.setdefault("include_usage", True)
    if rules.cache_key:
        key = request.get("prompt_cache_key")
        return key if isinstance(key, str) and key else None
    return None


def _patch_exactly(raw: bytes, rules: Rules, reason: str) -> tuple[bytes, str | None]:
    """The standard library's path: big integers stay exact and lone surrogates survive as escapes."""
    try:
        request = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError):
        raise InvalidBody(f"the request body is not valid JSON: {reason}" if reason else "invalid JSON") from None
    except RecursionError:
        raise InvalidBody("the request body is nested too deeply") from None
    if not isinstance(request, dict):
        raise InvalidBody(f"the request body must be a JSON object, not {_json_type(request)}")
    key = _apply(request, rules)
    try:
        return json.dumps(request, separators=(",", ":"), allow_nan=False).encode(), key
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
