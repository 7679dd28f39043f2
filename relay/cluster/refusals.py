"""What a client gets when the cluster's limits say no, in OpenAI's error shape. A spent budget is 429
`rate_limit_exceeded` (type `requests` or `tokens`, as OpenAI's own), with `retry-after` (and OpenAI's
`retry-after-ms`) saying when the budget would have let the request go; no slot within the wait is 503
`cluster_busy`; an unreachable Redis under `on_redis_error: fail` is 503 `cluster_unavailable`. OpenAI's
clients retry all three after `retry-after`."""

from __future__ import annotations

import math

from relay.failures import NEVER, Failure
from relay.settings import Cluster

REASONS = ("busy", "unavailable", "requests", "tokens", "paused")  # relay_cluster_refused_total{reason}


def refusal(reason: str, wait: float, settings: Cluster) -> Failure:
    """The answer to a request refused for `reason`, which could have gone in `wait` seconds."""
    headers = ((b"retry-after", str(max(1, math.ceil(wait))).encode()), (b"retry-after-ms", str(max(1, round(wait * 1000))).encode()))
    max_wait = settings.max_wait_seconds
    if reason == "busy":
        message = f"no cluster-wide slot became free within max_wait_seconds ({max_wait} s); try again"
        return Failure("cluster_busy", 503, "cluster_busy", message, NEVER, "server_error", headers)
    if reason == "unavailable":
        message = "the cluster's Redis is unreachable and cluster.on_redis_error is fail; try again"
        return Failure("cluster_unavailable", 503, "cluster_unavailable", message, NEVER, "server_error", headers)
    if reason == "paused":
        message = f"the upstream said its rate limit is spent; it resets in {wait:.1f} s, over max_wait_seconds ({max_wait} s)"
        return Failure("cluster_paused", 429, "rate_limit_exceeded", message, NEVER, "requests", headers)
    what = "requests_per_minute" if reason == "requests" else "tokens_per_minute"
    message = f"the cluster's {what} budget would have this request wait {wait:.1f} s, over max_wait_seconds ({max_wait} s)"
    return Failure(f"cluster_{reason}", 429, "rate_limit_exceeded", message, NEVER, reason, headers)
