"""Validation of each config key: one function per kind of value, and the table of keys. Each check
returns the value as Settings holds it, or raises ValueError with the rest of a sentence that starts
with the key's name; a message never quotes the value, which may be the API key."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from relay.errors import ConfigError
from relay.settings import ENDPOINT_BLOCKS, RetryPolicy, Settings

_LINE_BREAK = re.compile(r"[\r\n\x00]")
_UNPRINTABLE_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 field names
_RELAY_OWNED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


def validate(values: dict[str, Any], path: Path) -> Settings:
    unknown = sorted(set(values) - set(_CHECKS))
    if unknown:
        raise ConfigError(f"{path}: unknown key {_key_name(unknown[0])!r} (known keys: {', '.join(sorted(_CHECKS))})")
    for key in ("openai_base_url", "openai_api_key", "openai_model"):
        if values.get(key) is None:
            raise ConfigError(f"{path}: {key} is required")
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if value is None and key not in _NULLABLE:
            continue  # null means the default
        try:
            checked[key] = _CHECKS[key](value)
        except ValueError as exc:
            raise ConfigError(f"{path}: {key} {exc}") from None
    return Settings(**checked)


def _key_name(key: object) -> str:
    """An unknown key as far as it looks like a key name: a line such as `openai_api_key:sk-...` (no space
    after the colon) parses as one long key, and the secret in it must not be echoed."""
    name = re.match(r"[A-Za-z0-9_.-]*", str(key))
    shown = name.group(0) if name else ""
    return shown if shown == str(key) else f"{shown}..."


def _port(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ValueError("must be a port number from 0 to 65535 (0 picks a free port)")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value


def _base_url(value: Any) -> str:
    if _UNPRINTABLE_OR_SPACE.search(_text(value)):
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


def _positive_int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _seconds(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError("must be a number of seconds")
    return float(value)


def _timeout(value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError("must be a positive number of seconds, or null for no limit")
    return float(value)


def _cap(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return _positive_int(value)
    except ValueError:
        raise ValueError("must be a positive integer, or null for none") from None


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _access_log(value: Any) -> str:
    if value is False:
        return "off"
    if value not in ("off", "plain", "json"):
        raise ValueError("must be off, plain or json")
    return value


def _header_value(value: Any) -> str:
    text = _text(value)
    if _LINE_BREAK.search(text):
        raise ValueError("must be one line (no CR, LF or NUL): it goes into an HTTP header")
    return text


def _headers(value: Any) -> Mapping[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError("must map header names to string values")
    if not all(_TOKEN.fullmatch(k) for k in value) or any(_LINE_BREAK.search(v) for v in value.values()):
        raise ValueError("must have header names made of token characters and one-line values")
    if any(k.lower() == "authorization" for k in value):
        raise ValueError("must not set Authorization (the relay sends openai_api_key)")
    if any(k.lower() in _RELAY_OWNED_HEADERS for k in value):
        raise ValueError(f"must not set {', '.join(sorted(_RELAY_OWNED_HEADERS))} (the relay frames each request)")
    return MappingProxyType(dict(value))


def _extra_body(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError("must be a mapping of request fields to default values")
    for block in ENDPOINT_BLOCKS.values():
        if block in value and not (isinstance(value[block], dict) and all(isinstance(k, str) for k in value[block])):
            raise ValueError(f".{block} must be a mapping of that endpoint's request fields to default values")
    return MappingProxyType(dict(value))


def _api_keys(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):  # from an environment variable: comma-separated
        value = [key.strip() for key in value.split(",")]
    if not isinstance(value, list) or not all(isinstance(k, str) and k.strip() for k in value):
        raise ValueError("must be a list of non-empty strings, or null to accept any client")
    return tuple(value)


def _host_names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):  # from an environment variable: comma-separated
        value = [name.strip() for name in value.split(",")]
    if not isinstance(value, list) or not value or not all(isinstance(n, str) and n.strip() for n in value):
        raise ValueError('must be a list of host names (`*.example.com` for a domain), or ["*"] for any')
    if any(_UNPRINTABLE_OR_SPACE.search(n.strip()) or "/" in n for n in value):
        raise ValueError("must hold bare host names, without spaces, schemes or paths")
    return tuple(n.strip() for n in value)


def _retry(value: Any) -> RetryPolicy:
    if not isinstance(value, dict):
        raise ValueError("must be a mapping such as {max_attempts: 3}")
    known = {f.name for f in fields(RetryPolicy)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"has an unknown key {unknown[0]!r} (known keys: {', '.join(sorted(known))})")
    checks = {
        "max_attempts": _positive_int,
        "statuses": _statuses,
        "backoff": _seconds,
        "max_backoff": _seconds,
        "deadline": _seconds,
        "budget_ratio": _ratio,
        "budget_burst": _positive_int,
    }
    checked = {}
    for key, item in value.items():
        try:
            checked[key] = checks[key](item)
        except ValueError as exc:
            raise ValueError(f".{key} {exc}") from None
    return RetryPolicy(**checked)


def _statuses(value: Any) -> frozenset[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and 400 <= v <= 599 for v in value):
        raise ValueError("must be a list of HTTP error statuses (400-599)")
    return frozenset(value)


def _ratio(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ValueError("must be a number from 0 to 1")
    return float(value)


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "openai_base_url": _base_url,
    "openai_api_key": _header_value,
    "openai_model": _text,
    "openai_default_headers": _headers,
    "extra_body": _extra_body,
    "max_concurrent_requests": _cap,
    "host": _text,
    "port": _port,
    "max_request_bytes": _positive_int,
    "request_body_timeout": _timeout,
    "client_write_timeout": _timeout,
    "request_head_timeout": _timeout,
    "max_header_bytes": _positive_int,
    "offload_body_bytes": _cap,
    "connect_timeout": _timeout,
    "read_timeout": _timeout,
    "total_timeout": _timeout,
    "upstream_keepalive_seconds": _seconds,
    "shutdown_grace_seconds": _seconds,
    "retry_stale_connections": _flag,
    "allowed_hosts": _host_names,
    "relay_api_keys": _api_keys,
    "metrics": _flag,
    "metrics_require_auth": _flag,
    "access_log": _access_log,
    "log_bodies": _flag,
    "timing_header": _flag,
    "include_stream_usage": _flag,
    "retry": _retry,
}
# Keys whose null means "no limit" rather than "the default".
_NULLABLE = frozenset(
    {
        "max_concurrent_requests",
        "offload_body_bytes",
        "request_body_timeout",
        "client_write_timeout",
        "connect_timeout",
        "read_timeout",
        "total_timeout",
    }
)
