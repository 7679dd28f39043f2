"""Load the relay's YAML configuration into one frozen, validated Settings object.

The config is one file or several merged in order (`--config a.yaml --config b.yaml`, or RELAY_CONFIG
with paths separated by os.pathsep), in the relay's flat layout (conf/openai_model.yaml) or NeMo Gym's
nested one (relay.gym_layout). Under ng_run (`python -m relay.nemo_gym`) it is the merged config that Gym
hands each server in NEMO_GYM_CONFIG_DICT. Placeholders resolve as relay.interpolation says; each key is
checked by relay.checks. Every problem becomes one ConfigError line that names the key and where to set
it; a value is never part of a message, because the value may be the API key.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from relay import gym_layout
from relay.checks import known_keys, validate
from relay.errors import ConfigError
from relay.interpolation import Variables
from relay.settings import Settings

__all__ = ["ConfigError", "Settings", "load_settings"]

CONFIG_ENV = "RELAY_CONFIG"  # one path, or several separated by os.pathsep, merged in order
SERVER_ENV = "RELAY_SERVER"  # set by `relay serve --server`: the Gym server block to serve
ENV_FILE_ENV = "RELAY_ENV_FILE"
BIND_HOST_ENV = "RELAY_BIND_HOST"  # set by `relay serve --host`, which the config's `host` may not say
LOCAL_UPSTREAM_ENV = "RELAY_LOCAL_UPSTREAM"  # set by `relay serve --local`: the fake upstream's base URL
# Set by `python -m relay.nemo_gym`: the config is Gym's, in the two variables ng_run gives each server.
# Explicit, so a relay started from inside some Gym process does not read Gym's config by surprise.
FROM_GYM_ENV = "RELAY_FROM_NEMO_GYM"
GYM_CONFIG_DICT_ENV = "NEMO_GYM_CONFIG_DICT"
GYM_CONFIG_PATH_ENV = "NEMO_GYM_CONFIG_PATH"
DEFAULT_CONFIG = "conf/openai_model.yaml"
DEFAULT_ENV_FILE = "env.yaml"

ConfigPaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def load_settings(config_paths: ConfigPaths | None = None, server: str | None = None) -> Settings:
    """Read the config (the argument, else $RELAY_CONFIG, else conf/openai_model.yaml); `server` (else
    $RELAY_SERVER) picks the block of a Gym layout."""
    if os.environ.get(FROM_GYM_ENV) == "1":
        return _from_gym_environment()
    paths = _paths(config_paths)
    where = ", ".join(str(path) for path in paths)
    documents = [_mapping(_read_yaml(path, what="config file", hint=f"pass --config or set {CONFIG_ENV}"), path) for path in paths]
    named = os.environ.get(ENV_FILE_ENV)
    env_path = Path(named or DEFAULT_ENV_FILE)
    env_vars = _read_env_file(env_path, required=bool(named))
    merged = gym_layout.merge(documents)
    if not gym_layout.is_nested(merged):
        def unset(name: str) -> str:
            return f"add `{name}: ...` to {env_path.resolve()} (see env.example.yaml) or export {name.upper()}"

        return _settings(merged, where, "", Variables([env_vars], unset, lambda key: f"set it in {where}"))
    block = gym_layout.select(merged, server or os.environ.get(SERVER_ENV), where)
    variables = Variables([env_vars, block.variables], gym_layout.unset_hint, gym_layout.missing_hint(where))
    return _settings(block.keys, where, f"{block.path}.", variables)


def _from_gym_environment() -> Settings:
    """ng_run's config, unresolved as Gym hands it over: placeholders resolve against its own top-level
    keys (env.yaml is already merged in), then an env.yaml in the server's directory, then the environment."""
    text = os.environ.get(GYM_CONFIG_DICT_ENV)
    name = os.environ.get(GYM_CONFIG_PATH_ENV)
    if not text or not name:
        raise ConfigError(f"{GYM_CONFIG_DICT_ENV} and {GYM_CONFIG_PATH_ENV} must both be set (ng_run sets them for each server)")
    try:
        merged = _mapping(yaml.safe_load(text), Path(GYM_CONFIG_DICT_ENV))
    except yaml.YAMLError:
        raise ConfigError(f"{GYM_CONFIG_DICT_ENV} is not valid YAML") from None
    where = f"{GYM_CONFIG_DICT_ENV} ({name})"
    block = gym_layout.select(merged, name, where)
    env_vars = _read_env_file(Path(DEFAULT_ENV_FILE), required=False)
    keys = block.keys
    # Gym's agents send back the cookies a model server sets, as vllm_model relies on: a cookie of the
    # relay's own keeps each conversation on one upstream of a fleet.
    routing = keys.get("routing")
    if routing is None or (isinstance(routing, dict) and "session_cookie" not in routing):
        keys = {**keys, "routing": {**(routing or {}), "session_cookie": f"RelayModel___{name}"}}
    variables = Variables([block.variables, env_vars], gym_layout.unset_hint, gym_layout.missing_hint(where))
    return _settings(keys, where, f"{block.path}.", variables)


def _settings(config: Mapping[str, Any], where: str, prefix: str, variables: Variables) -> Settings:
    known_keys(config, where, prefix)
    local = os.environ.get(LOCAL_UPSTREAM_ENV)
    if local:
        config = _local_mode(config, local, lambda value: variables.resolve(value, f"{prefix}openai_model"))
    resolved = {key: variables.resolve(value, f"{prefix}{key}") for key, value in config.items()}
    return validate(resolved, where, prefix)


def _paths(config_paths: ConfigPaths | None) -> list[Path]:
    if config_paths is None:
        named = os.environ.get(CONFIG_ENV)
        return [Path(part) for part in named.split(os.pathsep) if part] if named else [Path(DEFAULT_CONFIG)]
    if isinstance(config_paths, (str, os.PathLike)):
        return [Path(config_paths)]
    return [Path(path) for path in config_paths]


def _local_mode(config: Mapping[str, Any], base_url: str, resolve: Callable[[Any], Any]) -> dict[str, Any]:
    """The fake upstream instead of the configured one, with a key of its own; the configured model if
    it resolves, else a made-up one."""
    try:
        model = resolve(config.get("openai_model"))
    except ConfigError:
        model = None
    return {**config, "openai_base_url": base_url, "openai_api_key": "sk-local-mode", "openai_model": model or "local-fake-model"}


def _mapping(data: Any, path: Path) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping of keys to values")
    return data


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
