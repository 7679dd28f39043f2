"""Load the relay's YAML configuration into one frozen, validated Settings object.

`${name}` placeholders resolve from env.yaml (credentials stay out of the committed config), then from
the environment. Every problem becomes one ConfigError line that names the key and where to set it; a
value is never part of a message, because the value may be the API key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
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


class ConfigError(Exception):
    """A configuration problem, phrased for the person who has to fix it."""


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
    connect_timeout: float | None = 10.0
    read_timeout: float | None = 1800.0
    total_timeout: float | None = None


_REQUIRED = ("openai_base_url", "openai_api_key", "openai_model")
_POSITIVE_INT = ("port", "max_request_bytes")
_OPTIONAL_POSITIVE_INT = ("max_concurrent_requests",)
_OPTIONAL_SECONDS = ("connect_timeout", "read_timeout", "total_timeout")
_NON_EMPTY_STR = ("openai_base_url", "openai_api_key", "openai_model", "host")


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
    known = {f.name for f in fields(Settings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(known))})")
    for key in _REQUIRED:
        if values.get(key) is None:
            raise ConfigError(f"{path}: {key} is required")
    present = {key: value for key, value in values.items() if value is not None or key in _nullable()}
    for key in _NON_EMPTY_STR:
        if key in present and (not isinstance(present[key], str) or not present[key].strip()):
            raise ConfigError(f"{path}: {key} must be a non-empty string")
    for key in _POSITIVE_INT:
        if key in present and not _is_positive_int(present[key]):
            raise ConfigError(f"{path}: {key} must be a positive integer")
    for key in _OPTIONAL_POSITIVE_INT:
        if present.get(key) is not None and not _is_positive_int(present[key]):
            raise ConfigError(f"{path}: {key} must be a positive integer or null (no limit)")
    for key in _OPTIONAL_SECONDS:
        value = present.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ConfigError(f"{path}: {key} must be a positive number of seconds or null (no limit)")
        if value is not None:
            present[key] = float(value)
    _check_url(present["openai_base_url"], path)
    present["openai_default_headers"] = _headers(present.get("openai_default_headers"), path)
    present["extra_body"] = _extra_body(present.get("extra_body"), path)
    return Settings(**present)


def _nullable() -> set[str]:
    return set(_OPTIONAL_POSITIVE_INT) | set(_OPTIONAL_SECONDS)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_url(url: str, path: Path) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{path}: openai_base_url must be an http(s) URL such as https://api.openai.com/v1")
    if parts.query or parts.fragment:
        raise ConfigError(f"{path}: openai_base_url must not carry a query string or fragment")


def _headers(value: Any, path: Path) -> Mapping[str, str]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"{path}: openai_default_headers must map header names to string values")
    if any(k.lower() == "authorization" for k in value):
        raise ConfigError(f"{path}: openai_default_headers must not set Authorization; use openai_api_key")
    return MappingProxyType(dict(value))


def _extra_body(value: Any, path: Path) -> Mapping[str, Any]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{path}: extra_body must be a mapping of request fields to default values")
    return MappingProxyType(dict(value))
