"""Checks of config values, one function per kind of value. Each returns the value as Settings holds
it, or raises ValueError with the rest of a sentence that starts with the key's name; a message never
quotes the value, which may be the API key."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from relay.settings import ENDPOINT_BLOCKS

_LINE_BREAK = re.compile(r"[\r\n\x00]")
_UNPRINTABLE_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 field names
_KEY_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
_RELAY_OWNED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
# Values from the environment (${oc.env:...}, or a ${name} found there) arrive as text, as they do in Gym,
# whose pydantic reads "3" as 3 and "False" as false: numbers and truth values written as text count.
_NUMBER = re.compile(r"\s*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*")
_TRUTH = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False, "1": True, "0": False}


def _number(value: Any) -> Any:
    """A number written as text as that number; anything else unchanged (for the check to refuse)."""
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        try:
            return int(value)
        except ValueError:
            return float(value)
    return value


def port(value: Any) -> int:
    value = _number(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ValueError("must be a port number from 0 to 65535 (0 picks a free port)")
    return value


def text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value


def base_url(value: Any) -> str:
    if _UNPRINTABLE_OR_SPACE.search(text(value)):
        raise ValueError("must not contain spaces or control characters: it goes into the request line")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL such as https://api.openai.com/v1")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query string or fragment")
    if parts.username is not None or parts.password is not None:
        # Credentials in the URL would be logged with it; the key belongs in openai_api_key.
        raise ValueError("must not carry a user name or password; put the key in openai_api_key")
    return value


def redis_url(value: Any) -> str:
    if _UNPRINTABLE_OR_SPACE.search(text(value)):
        raise ValueError("must not contain spaces or control characters")
    if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// (TLS) or unix:// URL such as redis://127.0.0.1:6379/0")
    return value


def key_prefix(value: Any) -> str:
    # Braces would break the key's hash tag (relay.cluster.store), which keeps a job's keys in one slot.
    if not isinstance(value, str) or not _KEY_NAME.fullmatch(value):
        raise ValueError("must be 1 to 100 letters, digits or . _ : - (it names the job's keys in Redis)")
    return value


def positive_int(value: Any) -> int:
    value = _number(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError("must be a positive integer")
    return value


def seconds(value: Any) -> float:
    value = _number(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError("must be a number of seconds")
    return float(value)


def timeout(value: Any) -> float | None:
    if value is None:
        return None
    value = _number(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError("must be a positive number of seconds, or null for no limit")
    return float(value)


def cap(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return positive_int(value)
    except ValueError:
        raise ValueError("must be a positive integer, or null for none") from None


def flag(value: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in _TRUTH:
        return _TRUTH[value.strip().lower()]
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def access_log(value: Any) -> str:
    if value is False:
        return "off"
    if value not in ("off", "plain", "json"):
        raise ValueError("must be off, plain or json")
    return value


def header_value(value: Any) -> str:
    line = text(value)
    if _LINE_BREAK.search(line):
        raise ValueError("must be one line (no CR, LF or NUL): it goes into an HTTP header")
    return line


def headers(value: Any) -> Mapping[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError("must map header names to string values")
    if not all(_TOKEN.fullmatch(k) for k in value) or any(_LINE_BREAK.search(v) for v in value.values()):
        raise ValueError("must have header names made of token characters and one-line values")
    if any(k.lower() == "authorization" for k in value):
        raise ValueError("must not set Authorization (the relay sends openai_api_key)")
    if any(k.lower() in _RELAY_OWNED_HEADERS for k in value):
        raise ValueError(f"must not set {', '.join(sorted(_RELAY_OWNED_HEADERS))} (the relay frames each request)")
    return MappingProxyType(dict(value))


def extra_body(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError("must be a mapping of request fields to default values")
    for block in ENDPOINT_BLOCKS.values():
        if block in value and not (isinstance(value[block], dict) and all(isinstance(k, str) for k in value[block])):
            raise ValueError(f".{block} must be a mapping of that endpoint's request fields to default values")
    return MappingProxyType(dict(value))


def api_keys(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):  # from an environment variable: comma-separated
        value = [key.strip() for key in value.split(",")]
    if not isinstance(value, list) or not all(isinstance(k, str) and k.strip() for k in value):
        raise ValueError("must be a list of non-empty strings, or null to accept any client")
    return tuple(value)


def host_names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):  # from an environment variable: comma-separated
        value = [name.strip() for name in value.split(",")]
    if not isinstance(value, list) or not value or not all(isinstance(n, str) and n.strip() for n in value):
        raise ValueError('must be a list of host names (`*.example.com` for a domain), or ["*"] for any')
    if any(_UNPRINTABLE_OR_SPACE.search(n.strip()) or "/" in n for n in value):
        raise ValueError("must hold bare host names, without spaces, schemes or paths")
    return tuple(n.strip() for n in value)


def statuses(value: Any) -> frozenset[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and 400 <= v <= 599 for v in value):
        raise ValueError("must be a list of HTTP error statuses (400-599)")
    return frozenset(value)


def ratio(value: Any) -> float:
    value = _number(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ValueError("must be a number from 0 to 1")
    return float(value)


def key_name(key: object) -> str:
    """An unknown key as far as it looks like a key name: a line such as `openai_api_key:sk-...` (no space
    after the colon) parses as one long key, and the secret in it must not be echoed."""
    name = re.match(r"[A-Za-z0-9_.-]*", str(key))
    shown = name.group(0) if name else ""
    return shown if shown == str(key) else f"{shown}..."


def choice(*allowed: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return check


def at_least(least: float) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        value = _number(value)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < least:
            raise ValueError(f"must be a number of at least {least}")
        return float(value)

    return check


def url_path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or _UNPRINTABLE_OR_SPACE.search(value):
        raise ValueError("must be a path such as /models")
    return value


def cookie_name(value: Any) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ValueError("must be a cookie name (token characters)")
    return value


def capture_dir(value: Any) -> str:
    """Gym's rule: an absolute directory (every server and the collector must name the same one); made
    here, as Gym's servers make it, so a path that cannot be written stops start-up instead of every call."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("is required when observability_enabled is true")
    if not os.path.isabs(value):
        raise ValueError("must be an absolute path")
    try:
        os.makedirs(value, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot be created: {exc.strerror}") from None
    return value
