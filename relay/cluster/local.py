"""What one process allows itself while the cluster's Redis is unreachable (`on_redis_error: local`): an
even share of each cluster-wide limit, split over `fallback_processes`, else over the relay processes
that Redis last counted (one, if it never answered)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from relay.cluster.budget import Admitted, Bucket, reserve, share
from relay.settings import Cluster


class Fallback:
    def __init__(self, settings: Cluster) -> None:
        self.settings = settings
        self.processes = 0
        self.cap: int | None = None
        self.buckets: tuple[Bucket | None, Bucket | None] = (None, None)
        self._share(settings.fallback_processes or 1)

    def seen(self, processes: int) -> None:
        """Redis counted this many live relay processes."""
        if self.settings.fallback_processes is None and processes != self.processes:
            self._share(processes)

    def admit(self, batch: Sequence[tuple[int, float]], held: int, now: float, pause_until: float) -> Admitted:
        """`batch`: (token cost, allowance ms) of the first waiters; `held`: slots this process holds."""
        slots = len(batch) if self.cap is None else max(0, min(len(batch), self.cap - held))
        taken, reason, refused_wait, waits = 0, 0, 0, []
        for cost, allowance in batch[:slots]:
            wait, reason = reserve(self.buckets, now, cost, allowance, pause_until)
            if reason:
                refused_wait = math.ceil(wait)
                break
            waits.append(int(wait))
            taken += 1
        left = [bucket.remaining(now) if bucket is not None else -1 for bucket in self.buckets]
        return Admitted(taken, reason, refused_wait, int(now), held + taken, False, left[0], left[1], waits)

    def correct(self, now: float, unsent: int, token_delta: int) -> None:
        """Requests that never went are refunded; the token charge becomes the answer's usage."""
        requests, tokens = self.buckets
        if requests is not None and unsent:
            requests.correct(now, -unsent)
        if tokens is not None and token_delta:
            tokens.correct(now, token_delta)

    def _share(self, processes: int) -> None:
        settings = self.settings
        self.processes = processes
        self.cap = share(settings.max_concurrent_requests, processes)
        rates = (share(settings.requests_per_minute, processes), share(settings.tokens_per_minute, processes))
        self.buckets = tuple(Bucket(rate, settings.burst_seconds) if rate else None for rate in rates)  # type: ignore[assignment]
