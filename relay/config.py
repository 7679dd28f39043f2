"""Load the relay's YAML configuration into one frozen, validated Settings object.

`${name}` placeholders resolve from env.yaml (credentials stay out of the committed config), then from
the environment. Every problem becomes one ConfigError line that names the key and where to set it; a
value is never part of a message, because the value may be the API key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import yaml

CONFIG_ENV = "RELAY_CONFIG"
ENV_FILE_ENV = "RELAY_ENV_FILE"
DEFAULT_CONFIG = "conf/openai_model.yaml"
DEFAULT_ENV_FILE = "env.yaml"

_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_LINE_BREAK = re.compile(r"[\r\n\x00]")
_UNPRINTABLE_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 field names
_RELAY_OWNED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


class ConfigError(Exception):
    """A configuration problem, phrased for the person who has to fix it."""


@dataclass(frozen=True)
class RetryPolicy:
    """Opt-in retries of upstream failures that happen before anything reaches the client."""

    max_attempts: int = 1  # 1 = no retries
    statuses: frozenset[int] = frozenset({429, 502, 503, 504})
    backoff: float = 0.5  # first sleep's ceiling (full jitter), doubling each attempt
    max_backoff: float = 30.0
    deadline: float = 120.0  # no retry starts later than this after the request arrived
    # Process-wide budget: retries may add at most this share of the requests (plus a small burst), so
    # a failing upstream can never be hit by a storm of retries.
    budget_ratio: float = 0.2
    budget_burst: int = 20

    @property
    def enabled(self) -> bool:
        return self.max_attempts > 1


@dataclass(frozen=True)
class Settings:
    openai_base_url: str
    openai_api_key: str = field(repr=False)
    openai_model: str
    openai_default_headers: Mapping[str, str] = field(default_factory=dict)
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    max_concurrent_requests: int | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_request_bytes: int = 64 * 1024 * 1024
    request_body_timeout: float | None = 60.0  # seconds for a client to send its whole body
    client_write_timeout: float | None = 300.0  # seconds a client may accept no byte of its response
    request_head_timeout: float = 30.0  # seconds for a request line and headers (relay serve's protocol)
    max_header_bytes: int = 64 * 1024  # request line and headers together
    offload_body_bytes: int | None = 4 * 1024 * 1024  # bodies this big are patched in a helper process
    connect_timeout: float | None = 10.0
    read_timeout: float | None = 1800.0
    total_timeout: float | None = None
    # Shorter than the 5 s after which uvicorn-based upstreams (vLLM, SGLang) close idle connections, so
    # the relay drops a pooled connection before the upstream does and never reuses a dying one.
    upstream_keepalive_seconds: float = 4.0
    shutdown_grace_seconds: float = 30.0
    relay_api_keys: tuple[str, ...] = field(default=(), repr=False)
    metrics: bool = True
    metrics_require_auth: bool = False
    access_log: str = "off"
    log_bodies: bool = False
    timing_header: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)


def load_settings(config_path: str | os.PathLike[str] | None = None) -> Settings:
    """Read the config file (argument, else $RELAY_CONFIG, else conf/openai_model.yaml)."""
    path = Path(config_path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    raw = _read_yaml(path, what="config file", hint=f"pass --config or set {CONFIG_ENV}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping of keys to values")
    env_path = Path(os.environ.get(ENV_FILE_ENV) or DEFAULT_ENV_FILE)
    variables = _read_env_file(env_path)
    resolved = {key: _interpolate(value, key, variables, env_path) for key, value in raw.items()}
    return _validate(resolved, path)


def _read_yaml(path: Path, what: str, hint: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} not found ({hint})") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{what} {path} is not valid YAML{line}") from None


def _read_env_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = _read_yaml(path, what="env file", hint="")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"env file {path} must be a YAML mapping like `policy_api_key: sk-...`")
    return data


def _interpolate(value: Any, key: str, variables: Mapping[str, Any], env_path: Path) -> Any:
    if isinstance(value, str):
        whole = _PLACEHOLDER.fullmatch(value)
        if whole:  # a lone placeholder keeps the variable's YAML type (a number stays a number)
            return _lookup(whole.group(1), key, variables, env_path)
        return _PLACEHOLDER.sub(lambda m: str(_lookup(m.group(1), key, variables, env_path)), value)
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{key}.{k}", variables, env_path) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{key}[{i}]", variables, env_path) for i, v in enumerate(value)]
    return value


def _lookup(name: str, key: str, variables: Mapping[str, Any], env_path: Path) -> Any:
    if variables.get(name) is not None:
        return variables[name]
    for env_name in (name, name.upper()):
        if os.environ.get(env_name):
            return os.environ[env_name]
    raise ConfigError(
        f"{key}: ${{{name}}} is not set; add `{name}: ...` to {env_path.resolve()} "
        f"(see env.example.yaml) or export {name.upper()}"
    )


def _validate(values: dict[str, Any], path: Path) -> Settings:
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
    return MappingProxyType(dict(value))


def _api_keys(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):  # from an environment variable: comma-separated
        value = [key.strip() for key in value.split(",")]
    if not isinstance(value, list) or not all(isinstance(k, str) and k.strip() for k in value):
        raise ValueError("must be a list of non-empty strings, or null to accept any client")
    return tuple(value)


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
    "relay_api_keys": _api_keys,
    "metrics": _flag,
    "metrics_require_auth": _flag,
    "access_log": _access_log,
    "log_bodies": _flag,
    "timing_header": _flag,
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
