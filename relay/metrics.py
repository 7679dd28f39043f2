"""Prometheus metrics through prometheus-client, and GET /metrics.

With several workers, `relay serve` points PROMETHEUS_MULTIPROC_DIR at a fresh directory before the
workers start, and /metrics then adds up the files of every worker (prometheus-client's multiprocess
mode). Metric objects are process-wide, as the registry is: they are created once, on first use.

The hot path counts in plain numbers (EndpointMetrics.record, histogram buckets tallied by Tally, the slot
counts of relay.slots) and Metrics.flush hands them to prometheus-client every FLUSH_SECONDS: each
prometheus-client call takes a lock and walks several objects, and the seven a request needed cost more
than the rest of its bookkeeping together. /metrics flushes its own process first, so one worker's scrape
is exact and another worker's figures are at most FLUSH_SECONDS old. Rare events count as they happen.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess
from starlette.types import Receive, Scope, Send

from relay.failures import KINDS
from relay.seams import prometheus_internals
from relay.usage import Tokens

log = logging.getLogger("relay")

FLUSH_SECONDS = 0.5  # at 8,000 requests/s a flush holds the loop about 5 ms

# From sub-millisecond slot waits to reasoning models that think for many minutes.
SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
RETRY_REASONS = ("stale_connection", "failover", *KINDS[:-1], "429", "500", "502", "503", "504")
REFUSAL_REASONS = ("invalid_host", "invalid_origin", "invalid_api_key")
TOKEN_KINDS = ("prompt", "completion", "cached_prompt", "reasoning")  # the fields of relay.usage.Tokens

prometheus_client.disable_created_metrics()  # *_created series: one more per label set, read by nobody


class Metrics:
    def __init__(self) -> None:
        self.bulk = prometheus_internals.bulk_supported()
        if not self.bulk:
            log.warning("relay: %s; histograms fall back to observe()", prometheus_internals.problems()[0])
        self.requests = Counter("relay_requests", "Requests answered, by endpoint and status", ["endpoint", "status"])
        self.in_flight = Gauge("relay_upstream_in_flight", "Upstream requests in flight", multiprocess_mode="livesum")
        self.waiting = Gauge("relay_slot_waiting", "Requests waiting for a concurrency slot", multiprocess_mode="livesum")
        self.slot_wait = Histogram("relay_slot_wait_seconds", "Time spent waiting for a concurrency slot", buckets=SECONDS)
        self.ttfb = Histogram("relay_upstream_ttfb_seconds", "Upstream time to response headers", ["endpoint"], buckets=SECONDS)
        self.duration = Histogram(
            "relay_request_duration_seconds", "Whole request, body relayed", ["endpoint"], buckets=SECONDS
        )
        self.bytes_in = Counter("relay_request_bytes", "Request body bytes received from clients", ["endpoint"])
        self.bytes_out = Counter("relay_response_bytes", "Response body bytes relayed to clients", ["endpoint"])
        self.tokens = Counter("relay_tokens", "Tokens of relayed answers, from their usage, by endpoint and kind", ["endpoint", "kind"])
        self.upstream_errors = Counter("relay_upstream_errors", "Upstream failures, by kind", ["kind"])
        self.retries = Counter("relay_retries", "Upstream requests tried again, by reason", ["reason"])
        self.refused = Counter("relay_refused", "Requests refused before routing, by reason", ["reason"])
        self.fleet = FleetMetrics()
        # Alerts take rate() of these: a series that exists from the first scrape has a rate from the second.
        for labelled, values in ((self.upstream_errors, KINDS), (self.retries, RETRY_REASONS), (self.refused, REFUSAL_REASONS)):
            for value in values:
                labelled.labels(value)
        self.slot_wait_tally = Tally(self.slot_wait, self.bulk)
        self._endpoints: dict[str, EndpointMetrics] = {}

    def endpoint(self, label: str) -> EndpointMetrics:
        if label not in self._endpoints:
            self._endpoints[label] = EndpointMetrics(self, label)
        return self._endpoints[label]

    def flush(self, in_flight: int, waiting: int, fleet: Any) -> None:
        self.in_flight.set(in_flight)
        self.waiting.set(waiting)
        for endpoint in self._endpoints.values():
            endpoint.flush()
        self.slot_wait_tally.flush()
        self.fleet.flush(fleet)


class FleetMetrics:
    """Each upstream's figures (label `upstream`: host:port, never a key), sampled or handed over at each
    flush from the plain numbers relay.fleet keeps: in flight, ejected, answers by status, affinity."""

    def __init__(self) -> None:
        self.in_flight = Gauge("relay_fleet_in_flight", "Requests in flight, by upstream", ["upstream"], multiprocess_mode="livesum")
        self.ejected = Gauge("relay_fleet_ejected", "1 while an upstream is ejected", ["upstream"], multiprocess_mode="livemax")
        self.answers = Counter("relay_fleet_answers", "Answers received, by upstream and status", ["upstream", "status"])
        self.errors = Counter("relay_fleet_errors", "Upstream failures, by upstream and kind", ["upstream", "kind"])
        self.affinity = Counter("relay_affinity", "Requests with a conversation key: on its own upstream, or spilled over", ["result"])
        self._seen: set[str] = set()

    def flush(self, fleet: Any) -> None:
        for member in fleet.members:
            label = member.label
            if label not in self._seen:  # a series per upstream from the first scrape
                self._seen.add(label)
                for kind in KINDS:
                    self.errors.labels(label, kind)
            self.in_flight.labels(label).set(member.in_flight)
            self.ejected.labels(label).set(1 if member.health.state == "ejected" else 0)
            for status, count in member.answers.items():
                self.answers.labels(label, str(status)).inc(count)
            member.answers.clear()
        for result, count in (("hit", fleet.hits), ("spill", fleet.spills)):
            if count:
                self.affinity.labels(result).inc(count)
        fleet.hits = fleet.spills = 0


class Tally:
    """Observations of one histogram child, counted per bucket until the next flush: a value costs one
    bisect (C) instead of observe()'s two locks and Python bucket walk (relay.seams.prometheus_internals)."""

    def __init__(self, child: Histogram, bulk: bool = True) -> None:
        self._child = child
        self._bounds = prometheus_internals.bucket_bounds(child) if bulk else ()
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        if not bulk:
            self.add = child.observe  # type: ignore[method-assign]

    def add(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1  # buckets are "less than or equal"
        self._sum += value

    def flush(self) -> None:
        if self._bounds:
            prometheus_internals.add_observations(self._child, self._counts, self._sum)
            self._counts = [0] * len(self._bounds)
            self._sum = 0.0


class EndpointMetrics:
    """The finished requests of one endpoint, tallied until the next flush."""

    def __init__(self, metrics: Metrics, label: str) -> None:
        self._metrics = metrics
        self._label = label
        self._requests: dict[int, Counter] = {}  # the counter child of each status seen
        self._duration = Tally(metrics.duration.labels(label), metrics.bulk)
        self._ttfb = Tally(metrics.ttfb.labels(label), metrics.bulk)
        self._bytes_in = metrics.bytes_in.labels(label)
        self._bytes_out = metrics.bytes_out.labels(label)
        self._tokens = [metrics.tokens.labels(label, kind) for kind in TOKEN_KINDS]
        self._statuses: dict[int, int] = {}
        self._received = 0
        self._relayed = 0
        self._counted = [0, 0, 0, 0]  # tokens by TOKEN_KINDS

    def record(
        self,
        status: int,
        duration: float,
        ttfb: float | None,
        bytes_in: int,
        bytes_out: int,
        slot_wait: float,
        tokens: Tokens | None,
    ) -> None:
        self._statuses[status] = self._statuses.get(status, 0) + 1
        self._duration.add(duration)
        if ttfb is not None:
            self._ttfb.add(ttfb)
        if slot_wait:
            self._metrics.slot_wait_tally.add(slot_wait)
        self._received += bytes_in
        self._relayed += bytes_out
        if tokens is not None:
            counted = self._counted
            counted[0] += tokens[0]
            counted[1] += tokens[1]
            counted[2] += tokens[2]
            counted[3] += tokens[3]

    def flush(self) -> None:
        for status, count in self._statuses.items():
            if status not in self._requests:
                self._requests[status] = self._metrics.requests.labels(self._label, str(status))
            self._requests[status].inc(count)
        self._statuses.clear()
        self._duration.flush()
        self._ttfb.flush()
        self._bytes_in.inc(self._received)
        self._bytes_out.inc(self._relayed)
        self._received = self._relayed = 0
        for child, count in zip(self._tokens, self._counted):
            if count:
                child.inc(count)
        self._counted = [0, 0, 0, 0]


@functools.cache
def metrics() -> Metrics:
    return Metrics()


def refused(reason: str) -> None:
    """Counted where the app made the metrics (`metrics: true`); a refusal never makes them itself."""
    if metrics.cache_info().currsize:
        metrics().refused.labels(reason).inc()


async def keep_flushing(flush: Callable[[], None]) -> None:
    """The app runs this as a task for as long as it serves. A failing flush is logged (once, until one
    succeeds again), never fatal: /metrics would otherwise freeze at the last good flush."""
    failing = False
    while True:
        await asyncio.sleep(FLUSH_SECONDS)
        try:
            flush()
        except Exception:
            if not failing:
                log.exception("relay: handing metrics to prometheus-client failed; retrying every %s s", FLUSH_SECONDS)
            failing = True
        else:
            if failing:
                log.warning("relay: metrics are handed over again")
            failing = False


class MetricsEndpoint:
    """GET /metrics in the Prometheus text format."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self.flush = flush  # this process's counts, into prometheus-client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.flush()
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = REGISTRY
        body = generate_latest(registry)
        headers = [(b"content-type", CONTENT_TYPE_LATEST.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
