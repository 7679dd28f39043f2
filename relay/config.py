"""Load the relay's YAML configuration into one frozen, validated Settings object.

`${name}` placeholders resolve from env.yaml, then from the environment (relay.interpolation); each key is
checked by relay.checks. Every problem becomes one ConfigError line that names the key and where to set
it; a value is never part of a message, because the value may be the API key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from relay.checks import validate
from relay.errors import ConfigError
from relay.interpolation import resolve
from relay.settings import Settings

__all__ = ["ConfigError", "Settings", "load_settings"]

CONFIG_ENV = "RELAY_CONFIG"
ENV_FILE_ENV = "RELAY_ENV_FILE"
BIND_HOST_ENV = "RELAY_BIND_HOST"  # set by `relay serve --host`, which the config's `host` may not say
LOCAL_UPSTREAM_ENV = "RELAY_LOCAL_UPSTREAM"  # set by `relay serve --local`: the fake upstream's base URL
DEFAULT_CONFIG = "conf/openai_model.yaml"
DEFAULT_ENV_FILE = "env.yaml"


def load_settings(config_path: str | os.PathLike[str] | None = None) -> Settings:
    """Read the config file (argument, else $RELAY_CONFIG, else conf/openai_model.yaml)."""
    path = Path(config_path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    raw = _read_yaml(path, what="config file", hint=f"pass --config or set {CONFIG_ENV}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping of keys to values")
    named = os.environ.get(ENV_FILE_ENV)
    env_path = Path(named or DEFAULT_ENV_FILE)
    variables = _read_env_file(env_path, required=bool(named))
    local = os.environ.get(LOCAL_UPSTREAM_ENV)
    if local:
        raw = _local_mode(raw, local, variables, env_path)
    resolved = {key: resolve(value, key, variables, env_path) for key, value in raw.items()}
    return validate(resolved, path)


def _local_mode(raw: dict[str, Any], base_url: str, variables: dict[str, Any], env_path: Path) -> dict[str, Any]:
    """The fake upstream instead of the configured one, with a key of its own; the configured model if
    it resolves, else a made-up one."""
    try:
        model = resolve(raw.get("openai_model"), "openai_model", variables, env_path)
    except ConfigError:
        model = None
    return {**raw, "openai_base_url": base_url, "openai_api_key": "sk-local-mode", "openai_model": model or "local-fake-model"}


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


def _read_env_file(path: Path, required: bool) -> dict[str, Any]:
    """The default env.yaml may be absent; one named with --env-file or $RELAY_ENV_FILE must be there."""
    if not required and not path.exists():
        return {}
    data = _read_yaml(path, what="env file", hint=f"named by --env-file or {ENV_FILE_ENV}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"env file {path} must be a YAML mapping like `policy_api_key: sk-...`")
    return data


