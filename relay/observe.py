"""What one request did (an Exchange), and where that goes when it ends: metrics and the access log.

The proxy fills an Exchange as the request goes; `Observer.finish` runs once, at the end. With metrics
and the access log both off, the relay builds no Observer and the hot path records nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import orjson

from relay.metrics import Metrics

access_log = logging.getLogger("relay.access")


@dataclass(slots=True)
class Exchange:
    path: str
    started: float  # time.perf_counter() when the request arrived
    bytes_in: int = 0
    slot_wait: float = 0.0
    ttfb: float | None = None  # upstream time to response headers
    status: int = 0  # what the client got; 0 if it left before any answer
    upstream_status: int | None = None
    bytes_out: int = 0
    error: str | None = None  # the kind of upstream failure that ended the request, if any
    request_id: str | None = None
    attempts: int = 0
    client_gone: bool = False  # the client disconnected or stopped reading before the end


class Observer:
    def __init__(self, endpoint: str, metrics: Metrics | None, log_format: str) -> None:
        self.metrics = metrics
        self.log_format = log_format
        self.requests = metrics.endpoint(endpoint) if metrics is not None else None

    def finish(self, exchange: Exchange) -> None:
        duration = time.perf_counter() - exchange.started
        if self.requests is not None:
            self.requests.record(
                exchange.status, duration, exchange.ttfb, exchange.bytes_in, exchange.bytes_out, exchange.slot_wait
            )
        if self.log_format != "off":
            self._log(exchange, duration)

    def upstream_failed(self, kind: str) -> None:
        """Counted as it happens, so a failure that a retry then mends still shows."""
        if self.metrics is not None:
            self.metrics.upstream_errors.labels(kind).inc()

    def retrying(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.retries.labels(reason).inc()

    def _log(self, exchange: Exchange, duration: float) -> None:
        fields = {
            "method": "POST",
            "path": exchange.path,
            "status": exchange.status,
            "upstream_status": exchange.upstream_status,
            "duration_ms": round(duration * 1000, 2),
            "ttfb_ms": None if exchange.ttfb is None else round(exchange.ttfb * 1000, 2),
            "slot_wait_ms": round(exchange.slot_wait * 1000, 2),
            "bytes_in": exchange.bytes_in,
            "bytes_out": exchange.bytes_out,
            "attempts": exchange.attempts,
            "error": exchange.error,
            "request_id": exchange.request_id,
            "client_gone": exchange.client_gone or None,
        }
        if self.log_format == "json":
            access_log.info(orjson.dumps(fields).decode())
        else:
            access_log.info(" ".join(f"{key}={value}" for key, value in fields.items() if value is not None))
