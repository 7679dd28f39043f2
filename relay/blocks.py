"""Checks of the config's nested mappings (`retry:`, `routing:`, the entries of `openai_base_url`): each
key of a block checked like a top-level one, an unknown key refused with the known ones listed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from typing import Any

from relay import values
from relay.settings import GYM_RETRY_STATUSES, Cluster, RetryPolicy, Routing, UpstreamSpec


def block(value: Any, cls: type, checks: Mapping[str, Callable[[Any], Any]], example: str, base: Any = None) -> Any:
    """`cls(**checked)` from a mapping whose keys are `cls`'s fields; with `base`, those keys replaced in it."""
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping such as {example}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"has an unknown key {values.key_name(unknown[0])!r} (known keys: {', '.join(sorted(known))})")
    checked = {}
    for key, item in value.items():
        try:
            checked[key] = checks[key](item)
        except ValueError as exc:
            raise ValueError(f".{key} {exc}") from None
    return cls(**checked) if base is None else replace(base, **checked)


def attempts_policy(attempts: int) -> RetryPolicy:
    """openai_model's `max_http_attempts` (attempts in all, so 1 is none) as the relay's retry policy: the
    relay's backoff, Retry-After and budget, the statuses of GYM_RETRY_STATUSES."""
    return RetryPolicy(max_attempts=attempts, statuses=GYM_RETRY_STATUSES)


def retry(value: Any, base: RetryPolicy | None = None) -> RetryPolicy:
    checks = {
        "max_attempts": values.positive_int,
        "statuses": values.statuses,
        "backoff": values.seconds,
        "max_backoff": values.seconds,
        "deadline": values.seconds,
        "budget_ratio": values.ratio,
        "budget_burst": values.positive_int,
    }
    return block(value, RetryPolicy, checks, "{max_attempts: 3}", base)


def routing(value: Any) -> Routing:
    checks = {
        "affinity": values.choice("auto", "none"),
        "balance": values.choice("least_in_flight", "round_robin"),
        "load_factor": values.at_least(1.0),
        "failover": values.flag,
        "failover_statuses": values.statuses,
        "eject_after": values.positive_int,
        "eject_seconds": values.seconds,
        "max_eject_seconds": values.seconds,
        "probe_interval": values.timeout,
        "probe_path": values.url_path,
        "session_cookie": values.cookie_name,
    }
    return block(value, Routing, checks, "{affinity: auto, balance: least_in_flight}")


def cluster(value: Any) -> Cluster:
    checks = {
        "redis_url": values.redis_url,
        "name": values.key_prefix,
        "max_concurrent_requests": values.cap,
        "requests_per_minute": values.cap,
        "tokens_per_minute": values.cap,
        "on_redis_error": values.choice("local", "fail"),
        "lease_seconds": values.at_least(1.0),
        "max_wait_seconds": values.seconds,
        "burst_seconds": values.seconds,
        "default_max_tokens": values.positive_int,
        "redis_timeout": values.timeout,
        "fallback_processes": values.cap,
    }
    example = "{redis_url: redis://127.0.0.1:6379/0, name: my-job, max_concurrent_requests: 512}"
    checked: Cluster = block(value, Cluster, checks, example)
    if not checked.redis_url or not checked.name:
        raise ValueError(f"needs {'name' if checked.redis_url else 'redis_url'} (such as {example})")
    if not checked.rates and checked.max_concurrent_requests is None:
        raise ValueError("sets no limit: give max_concurrent_requests, requests_per_minute or tokens_per_minute")
    if checked.redis_timeout is None:
        raise ValueError(".redis_timeout must be a positive number of seconds: no Redis call may wait forever")
    return checked


def upstreams(value: Any) -> str | tuple[UpstreamSpec, ...]:
    """One base URL, or a list of them, each a URL or a mapping {url, weight, api_key, max_concurrent_requests}."""
    if not isinstance(value, list):
        return values.base_url(value)
    if not value:
        raise ValueError("must name at least one upstream")
    entries = []
    for index, item in enumerate(value):
        try:
            entries.append(_entry(item))
        except ValueError as exc:
            raise ValueError(f"[{index}] {exc}") from None
    urls = [entry.url.rstrip("/") for entry in entries]
    duplicate = next((url for index, url in enumerate(urls) if url in urls[:index]), None)
    if duplicate is not None:
        raise ValueError(f"names the upstream {duplicate} twice")
    return tuple(entries)


def _entry(item: Any) -> UpstreamSpec:
    if isinstance(item, str):
        return UpstreamSpec(values.base_url(item))
    checks = {
        "url": values.base_url,
        "api_key": values.header_value,
        "weight": values.positive_int,
        "max_concurrent_requests": values.cap,
    }
    if isinstance(item, dict) and "url" not in item:
        raise ValueError("needs a url")
    return block(item, UpstreamSpec, checks, "{url: http://10.0.0.1:8000/v1, weight: 2}")
