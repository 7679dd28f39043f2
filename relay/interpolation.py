"""`${name}` placeholders in config values: from env.yaml first (credentials stay out of the committed
config), then from the environment (`name`, then `NAME`)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from relay.errors import ConfigError

_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def resolve(value: Any, key: str, variables: Mapping[str, Any], env_path: Path) -> Any:
    """`value` with every placeholder replaced; `key` names it in errors (`retry.max_attempts`)."""
    if isinstance(value, str):
        whole = _PLACEHOLDER.fullmatch(value)
        if whole:  # a lone placeholder keeps the variable's YAML type (a number stays a number)
            return _lookup(whole.group(1), key, variables, env_path)
        return _PLACEHOLDER.sub(lambda m: str(_lookup(m.group(1), key, variables, env_path)), value)
    if isinstance(value, dict):
        return {k: resolve(v, f"{key}.{k}", variables, env_path) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, f"{key}[{i}]", variables, env_path) for i, v in enumerate(value)]
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
