"""The cluster's metrics (prometheus-client, in the style of relay.metrics): sampled from the plain
numbers of the Gate at each flush, so the hot path never calls prometheus-client."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from relay.cluster.refusals import REASONS
from relay.metrics import SECONDS, Tally, metrics

if TYPE_CHECKING:
    from relay.cluster.gate import Gate


class ClusterMetrics:
    def __init__(self) -> None:
        self.redis_ok = Gauge(
            "relay_cluster_redis_ok", "1 while the cluster's Redis answers, 0 while this process falls back (on_redis_error)",
            multiprocess_mode="livemin",
        )  # fmt: skip
        self.slots_in_use = Gauge(
            "relay_cluster_slots_in_use", "Cluster slots in use across every process, as this process last saw",
            multiprocess_mode="livemax",
        )  # fmt: skip
        self.slots_held = Gauge("relay_cluster_slots_held", "Cluster slots held by this process", multiprocess_mode="livesum")
        self.waiting = Gauge("relay_cluster_waiting", "Requests waiting for a cluster slot or budget", multiprocess_mode="livesum")
        self.budget = Gauge(
            "relay_cluster_budget_remaining", "What a cluster budget could admit at once, as this process last saw",
            ["budget"], multiprocess_mode="livemin",
        )  # fmt: skip
        self.wait = Histogram("relay_cluster_wait_seconds", "Time admitted requests waited for a cluster slot and budget", buckets=SECONDS)
        self.redis_errors = Counter("relay_cluster_redis_errors", "Redis calls that failed or timed out")
        self.refused = Counter("relay_cluster_refused", "Requests refused by the cluster's limits, by reason", ["reason"])
        self.pauses = Counter("relay_cluster_upstream_pauses", "Times the upstream said its rate limit was spent (remaining 0)")
        self.tokens = Counter("relay_cluster_tokens_charged", "Tokens charged to the cluster's token budget (from usage)")
        for reason in REASONS:
            self.refused.labels(reason)
        self.wait_tally = Tally(self.wait, metrics().bulk)

    def flush(self, gate: Gate) -> None:
        self.redis_ok.set(1 if gate.link.ok else 0)
        self.slots_in_use.set(gate.slots_in_use)
        self.slots_held.set(len(gate.held))
        self.waiting.set(gate.waiting)
        for label, left in zip(("requests", "tokens"), gate.budget_left):
            if left >= 0:
                self.budget.labels(label).set(left)
        if gate.waits:
            for waited in gate.waits:
                self.wait_tally.add(waited)
            gate.waits.clear()
        self.wait_tally.flush()
        if gate.link.errors:
            self.redis_errors.inc(gate.link.errors)
            gate.link.errors = 0
        for reason, count in gate.refused.items():
            self.refused.labels(reason).inc(count)
        gate.refused.clear()
        if gate.pauses:
            self.pauses.inc(gate.pauses)
            gate.pauses = 0
        if gate.tokens_charged:
            self.tokens.inc(gate.tokens_charged)
            gate.tokens_charged = 0


@functools.cache
def cluster_metrics() -> ClusterMetrics:
    """Created once per process, like relay.metrics.metrics(): prometheus-client's registry is process-wide."""
    return ClusterMetrics()
