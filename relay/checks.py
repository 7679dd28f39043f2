"""Validation of a whole config: the table of keys and what checks each (relay.values for single values,
relay.blocks for nested mappings). Every problem is one ConfigError line that names the key."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from relay import blocks, values
from relay.errors import ConfigError
from relay.settings import Settings


def known_keys(config: Mapping[str, Any], where: str, prefix: str = "") -> None:
    """Refuse an unknown key, before anything is resolved: a misspelt key needs no value to be wrong."""
    unknown = sorted(set(config) - set(_CHECKS))
    if unknown:
        block = f" in {prefix.rstrip('.')}" if prefix else ""
        raise ConfigError(f"{where}: unknown key {values.key_name(unknown[0])!r}{block} (known keys: {', '.join(sorted(_CHECKS))})")


def validate(config: dict[str, Any], where: str, prefix: str = "") -> Settings:
    """Settings from resolved values, whose keys known_keys() has checked; `where` names the config in
    errors, `prefix` the block its keys are in (Gym's layout: `policy_model.responses_api_models.relay_model.`)."""
    for key in ("openai_base_url", "openai_api_key", "openai_model"):
        if config.get(key) is None:
            raise ConfigError(f"{where}: {prefix}{key} is required")
    checked: dict[str, Any] = {}
    for key, value in config.items():
        if value is None and key not in _NULLABLE:
            continue  # null means the default
        try:
            checked[key] = _CHECKS[key](value)
        except ValueError as exc:
            message = str(exc)
            joint = "" if message[:1] in ".[" else " "  # retry.max_attempts, openai_base_url[1]
            raise ConfigError(f"{where}: {prefix}{key}{joint}{message}") from None
    attempts = checked.pop("max_http_attempts", None)
    if attempts is not None:
        # openai_model's key, mapped onto the relay's policy; the keys an explicit `retry:` block sets win.
        checked["retry"] = blocks.retry(config.get("retry") or {}, blocks.attempts_policy(attempts))
    if checked.get("observability_enabled"):
        try:
            checked["model_call_capture_dir"] = values.capture_dir(checked.get("model_call_capture_dir"))
        except ValueError as exc:
            raise ConfigError(f"{where}: {prefix}model_call_capture_dir {exc}") from None
    return Settings(**checked)


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "openai_base_url": blocks.upstreams,
    "openai_api_key": values.header_value,
    "openai_model": values.text,
    "openai_default_headers": values.headers,
    "extra_body": values.extra_body,
    "max_concurrent_requests": values.cap,
    "host": values.text,
    "port": values.port,
    "max_request_bytes": values.positive_int,
    "request_body_timeout": values.timeout,
    "client_write_timeout": values.timeout,
    "request_head_timeout": values.timeout,
    "max_header_bytes": values.positive_int,
    "offload_body_bytes": values.cap,
    "connect_timeout": values.timeout,
    "read_timeout": values.timeout,
    "total_timeout": values.timeout,
    "upstream_keepalive_seconds": values.seconds,
    "shutdown_grace_seconds": values.seconds,
    "retry_stale_connections": values.flag,
    "allowed_hosts": values.host_names,
    "relay_api_keys": values.api_keys,
    "metrics": values.flag,
    "metrics_require_auth": values.flag,
    "access_log": values.access_log,
    "log_bodies": values.flag,
    "timing_header": values.flag,
    "include_stream_usage": values.flag,
    "retry": blocks.retry,
    "routing": blocks.routing,
    "max_http_attempts": values.positive_int,
    "drop_input_reasoning_items": values.flag,
    "name": values.text,
    "num_workers": values.cap,
    "observability_enabled": values.flag,
    "model_call_capture_dir": values.text,
    "model_call_capture_max_bytes": values.positive_int,
    "cluster": blocks.cluster,
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
