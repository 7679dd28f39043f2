"""NeMo Gym's config layout, read unchanged: server blocks nest as `<name>: <server type>: <impl>: {...}`,
files merge in order (Gym's `+config_paths=[a,b]`), and top-level keys that are not server blocks
(`policy_base_url`, Gym's own `head_server`, `observability_enabled`, ...) are the values `${name}` reads.

The relay serves one `responses_api_models` block: the one `--server` names, else the only one that looks
like openai_model (impl `openai_model` or `relay_model`, or a block with `openai_base_url`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from relay.errors import ConfigError

SERVER_TYPES = ("responses_api_models", "resources_servers", "responses_api_agents", "environment_servers")
MODEL_SERVERS = "responses_api_models"
RELAYED_IMPLS = ("openai_model", "relay_model")
# Keys Gym puts in every server block that mean nothing to the relay. (`host`, `port` and `num_workers`
# do: where to listen and how many processes; `name` is always the block's top-level key.)
GYM_ONLY_KEYS = frozenset({"entrypoint", "name", "domain", "datasets", "token_id_capture_non_generating_requests"})
# Gym's run-wide capture settings, top-level keys that the relay's block takes over.
CAPTURE_KEYS = ("observability_enabled", "model_call_capture_dir")
GYM_DEFAULT_ATTEMPTS = 3  # openai_model's max_http_attempts when the config does not say


@dataclass(frozen=True)
class ServerBlock:
    name: str  # the top-level key: policy_model
    impl: str  # openai_model, relay_model, ...
    keys: dict[str, Any]  # the block's keys the relay reads, plus the capture keys and `name`
    variables: dict[str, Any]  # the top-level keys that are not server blocks

    @property
    def path(self) -> str:
        """The block's keys are named from here in error lines: policy_model.responses_api_models.relay_model."""
        return f"{self.name}.{MODEL_SERVERS}.{self.impl}"


def merge(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """Later documents win, mappings merge key by key, anything else is replaced (OmegaConf.merge)."""
    merged: dict[str, Any] = {}
    for document in documents:
        merged = _merged(merged, document)
    return merged


def _merged(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _merged(result[key], value)
        else:
            result[key] = value
    return result


def is_nested(config: Mapping[str, Any]) -> bool:
    """Gym's layout: some top-level value is a server block."""
    return any(_is_server(value) for value in config.values())


def select(config: Mapping[str, Any], server: str | None, where: str) -> ServerBlock:
    models = {name: value[MODEL_SERVERS] for name, value in config.items() if isinstance(value, dict) and MODEL_SERVERS in value}
    if server is not None:
        if server not in models:
            known = ", ".join(models) or "none"
            raise ConfigError(f"{where}: --server {server} names no responses_api_models block (model servers: {known})")
        name = server
    else:
        candidates = [name for name, impls in models.items() if _relayable(impls)]
        if not candidates:
            raise ConfigError(
                f"{where}: no model server the relay can serve: a `<name>: responses_api_models: openai_model:` or "
                "`relay_model:` block, or one with openai_base_url"
            )
        if len(candidates) > 1:
            raise ConfigError(f"{where}: several model servers could be relayed ({', '.join(candidates)}); choose one with --server NAME")
        name = candidates[0]
    impls = models[name]
    if not isinstance(impls, dict) or len(impls) != 1:
        raise ConfigError(f"{where}: {name}.{MODEL_SERVERS} must hold exactly one implementation, such as relay_model:")
    impl, block = next(iter(impls.items()))
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: {name}.{MODEL_SERVERS}.{impl} must be a mapping of keys to values")
    variables = {key: value for key, value in config.items() if not _is_server(value)}
    keys = {key: value for key, value in block.items() if key not in GYM_ONLY_KEYS}
    keys.setdefault("max_http_attempts", GYM_DEFAULT_ATTEMPTS)
    keys.update({key: variables[key] for key in CAPTURE_KEYS if key in variables})
    keys["name"] = name
    return ServerBlock(name, impl, keys, variables)


def unset_hint(name: str) -> str:
    return f"add `{name}: ...` to env.yaml or to the config, pass ++{name}=... to ng_run, or export {name.upper()}"


def missing_hint(where: str) -> Callable[[str], str]:
    # Keys of the block are named from the top (policy_model.responses_api_models...), as ng_run takes them.
    return lambda key: f"set it in {where}, or pass ++{key}=... to ng_run"


def _is_server(value: Any) -> bool:
    return isinstance(value, dict) and any(kind in value for kind in SERVER_TYPES)


def _relayable(impls: Any) -> bool:
    if not isinstance(impls, dict):
        return False
    return any(impl in RELAYED_IMPLS or (isinstance(block, dict) and "openai_base_url" in block) for impl, block in impls.items())
