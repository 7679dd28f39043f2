"""What one request did (a RequestRecord), and where that goes when it ends: metrics and the access log.

The proxy fills a RequestRecord as the request goes; `Observer.finish` runs once, at the end. With
metrics and the access log both off, the app uses `Observer.silent()`, which records nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson

from relay.metrics import EndpointMetrics, Metrics
from relay.usage import CACHED, COMPLETION, PROMPT, REASONING, Tokens, tokens_in

access_log = logging.getLogger("relay.access")
_UNREAD = object()


@dataclass(slots=True)
class RequestRecord:
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
    last_chunks: tuple[bytes, bytes] = (b"", b"")  # the body's last two chunks, where its usage is
    upstream: str | None = None  # host:port of the upstream that answered (or was tried last)
    affinity: bytes | None = None  # the conversation's key, if the request named one (never logged)
    set_cookie: bytes | None = None  # a session cookie the relay hands to the client with its answer
    rollout_id: str | None = None  # NeMo Gym's rollout (the /ng-rollout/<id>/ prefix), for the access log
    tried: tuple[Any, ...] = ()  # the upstreams it failed over from (relay.fleet.Member)
    stale_resent: bool = False  # it went again after the keep-alive race (once at most)
    timed_out: bool = False  # a deadline of relay.deadlines ended it, before or during the answer
    admission: object | None = None  # the cluster slot and budget the request holds (relay.cluster)
    _tokens: object = _UNREAD

    def tokens(self) -> Tokens | None:
        """The usage of a whole, successful answer, read once: the metrics, the access log and the
        cluster's token budget all want it. One cut off in the middle (`error`) may end in a cut number."""
        if self._tokens is _UNREAD:
            ok = 200 <= self.status < 300 and self.error is None
            self._tokens = tokens_in(*self.last_chunks) if ok else None
        return self._tokens  # type: ignore[return-value]


class Observer:
    def __init__(self, endpoint: str, metrics: Metrics | None, log_format: str, model: str = "") -> None:
        self.metrics = metrics
        self.log_format = log_format
        self.model = model  # the model sent upstream, for the access log
        self.requests: EndpointMetrics | None = metrics.endpoint(endpoint) if metrics is not None else None

    @classmethod
    def silent(cls) -> Observer:
        return cls("", None, "off")

    def finish(self, record: RequestRecord) -> None:
        if self.requests is None and self.log_format == "off":
            return
        duration = time.perf_counter() - record.started
        counted = record.tokens()
        if self.requests is not None:
            self.requests.record(
                record.status, duration, record.ttfb, record.bytes_in, record.bytes_out, record.slot_wait, counted
            )
        if self.log_format != "off":
            self._log(record, duration, counted)

    def upstream_failed(self, record: RequestRecord, kind: str) -> None:
        """Counted as it happens, so a failure that a retry then mends still shows."""
        record.error = kind
        if self.metrics is not None:
            self.metrics.upstream_errors.labels(kind).inc()
            if record.upstream is not None:
                self.metrics.fleet.errors.labels(record.upstream, kind).inc()

    def retrying(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.retries.labels(reason).inc()

    def _log(self, record: RequestRecord, duration: float, counted: Tokens | None) -> None:
        fields = {
            "method": "POST",
            "path": record.path,
            "rollout_id": record.rollout_id,
            "model": self.model if record.attempts else None,
            "upstream": record.upstream,
            "status": record.status,
            "upstream_status": record.upstream_status,
            "duration_ms": round(duration * 1000, 2),
            "ttfb_ms": None if record.ttfb is None else round(record.ttfb * 1000, 2),
            "slot_wait_ms": round(record.slot_wait * 1000, 2),
            "bytes_in": record.bytes_in,
            "bytes_out": record.bytes_out,
            "attempts": record.attempts,
            "error": record.error,
            "request_id": record.request_id,
            "client_gone": record.client_gone or None,
            "prompt_tokens": counted[PROMPT] if counted is not None else None,
            "completion_tokens": counted[COMPLETION] if counted is not None else None,
            "cached_tokens": counted[CACHED] if counted is not None else None,
            "reasoning_tokens": counted[REASONING] if counted is not None else None,
        }
        if self.log_format == "json":
            access_log.info(orjson.dumps(fields).decode())
        else:
            access_log.info(" ".join(f"{key}={value}" for key, value in fields.items() if value is not None))
