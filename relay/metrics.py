"""Prometheus metrics through prometheus-client, and GET /metrics.

With several workers, `relay serve` points PROMETHEUS_MULTIPROC_DIR at a fresh directory before the
workers start, and /metrics then adds up the files of every worker (prometheus-client's multiprocess
mode). Metric objects are process-wide, as the registry is: they are created once, on first use.
"""

from __future__ import annotations

import functools
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess
from starlette.types import Receive, Scope, Send

# From sub-millisecond slot waits to reasoning models that think for many minutes.
_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    def __init__(self) -> None:
        self.requests = Counter("relay_requests", "Requests answered, by endpoint and status", ["endpoint", "status"])
        self.in_flight = Gauge(
            "relay_upstream_in_flight", "Upstream requests in flight", multiprocess_mode="livesum"
        )
        self.waiting = Gauge(
            "relay_slot_waiting", "Requests waiting for a concurrency slot", multiprocess_mode="livesum"
        )
        self.slot_wait = Histogram("relay_slot_wait_seconds", "Time spent waiting for a concurrency slot", buckets=_SECONDS)
        self.ttfb = Histogram(
            "relay_upstream_ttfb_seconds", "Upstream time to response headers", ["endpoint"], buckets=_SECONDS
        )
        self.duration = Histogram(
            "relay_request_duration_seconds", "Whole request, body relayed", ["endpoint"], buckets=_SECONDS
        )
        self.bytes_in = Counter("relay_request_bytes", "Request body bytes received from clients", ["endpoint"])
        self.bytes_out = Counter("relay_response_bytes", "Response body bytes relayed to clients", ["endpoint"])
        self.upstream_errors = Counter("relay_upstream_errors", "Upstream failures, by kind", ["kind"])
        self.retries = Counter("relay_retries", "Upstream requests tried again, by reason", ["reason"])


@functools.cache
def metrics() -> Metrics:
    return Metrics()


class MetricsEndpoint:
    """GET /metrics in the Prometheus text format."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = REGISTRY
        body = generate_latest(registry)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode()), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
