"""Cluster-wide limits on Redis: one concurrency cap, and one request and token budget, for every relay
process and host that names the same `cluster.name` (the `cluster:` key; README, "Cluster-wide limits").

- relay.cluster.gate      what a request calls: admit, release, upstream_said
- relay.cluster.pump      admitting: the waiters of a process and the one task that asks Redis for them
- relay.cluster.returns   giving back: released slots, refunds and token corrections, the upstream's pause
- relay.cluster.keeper    the renewal of the process's slots, its membership, the wake subscription
- relay.cluster.store     the Lua scripts and the redis-py client: the only module that imports redis
- relay.cluster.budget    the pure arithmetic: GCRA, token estimate, reset durations
- relay.cluster.local     the per-process share of the limits while Redis is unreachable
- relay.cluster.link      Redis's state as this process sees it, each change logged once
- relay.cluster.refusals  the OpenAI-shaped answers of a refused request
- relay.cluster.metrics   relay_cluster_* (prometheus-client)

Without a `cluster:` key none of this is built, and redis is never imported: `build` imports the store.
"""

from __future__ import annotations

from typing import NamedTuple

from relay.cluster.gate import Gate
from relay.cluster.keeper import Keeper
from relay.cluster.metrics import ClusterMetrics, cluster_metrics
from relay.settings import Cluster

__all__ = ["ClusterLimits", "Gate", "build"]


class ClusterLimits(NamedTuple):
    gate: Gate  # for relay.attempts
    keeper: Keeper  # its open, tasks and close go into the app's lifespan
    metrics: ClusterMetrics | None

    def flush(self) -> None:
        if self.metrics is not None:
            self.metrics.flush(self.gate)


def build(settings: Cluster, with_metrics: bool) -> ClusterLimits:
    from relay.cluster.store import Store  # here, not at the top: only a configured cluster loads redis

    gate = Gate(settings, Store(settings))
    recorder = cluster_metrics() if with_metrics else None
    if recorder is not None:
        gate.waits = []
    return ClusterLimits(gate, Keeper(gate), recorder)
