"""The relay's settings: one frozen object, validated once at start-up (relay.config builds it) and
passed down explicitly."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


# extra_body may hold defaults for one endpoint only, under these keys (no request field has either name).
ENDPOINT_BLOCKS = {"/chat/completions": "chat_completions", "/responses": "responses"}


@dataclass(frozen=True)
class RetryPolicy:
    """Opt-in retries of upstream failures that happen before anything reaches the client."""

    max_attempts: int = 1  # 1 = no retries
    statuses: frozenset[int] = frozenset({429, 502, 503, 504})
    backoff: float = 0.5  # first sleep's ceiling (full jitter), doubling each attempt
    max_backoff: float = 30.0
    deadline: float = 120.0  # no retry starts later than this after the request arrived
    # Process-wide budget: retries may add at most this share of the requests (plus a small burst), so
    # a failing upstream can never be hit by a storm of retries.
    budget_ratio: float = 0.2
    budget_burst: int = 20

    @property
    def enabled(self) -> bool:
        return self.max_attempts > 1


@dataclass(frozen=True)
class Settings:
    openai_base_url: str
    openai_api_key: str = field(repr=False)
    openai_model: str
    openai_default_headers: Mapping[str, str] = field(default_factory=dict)
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    max_concurrent_requests: int | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_request_bytes: int = 64 * 1024 * 1024
    request_body_timeout: float | None = 60.0  # seconds for a client to send its whole body
    client_write_timeout: float | None = 300.0  # seconds a client may accept no byte of its response
    request_head_timeout: float = 30.0  # seconds for a request line and headers (relay serve's protocol)
    max_header_bytes: int = 64 * 1024  # request line and headers together
    offload_body_bytes: int | None = 4 * 1024 * 1024  # bodies this big are patched in a helper process
    connect_timeout: float | None = 10.0
    read_timeout: float | None = 1800.0
    total_timeout: float | None = None
    # Shorter than the 5 s after which uvicorn-based upstreams (vLLM, SGLang) close idle connections, so
    # the relay drops a pooled connection before the upstream does and never reuses a dying one.
    upstream_keepalive_seconds: float = 4.0
    shutdown_grace_seconds: float = 30.0
    # A request that crossed the upstream's close of an idle pooled connection goes again, once, on a new one.
    retry_stale_connections: bool = True
    allowed_hosts: tuple[str, ...] = ()  # () = the default: loopback names and the bind host; "*" = any
    relay_api_keys: tuple[str, ...] = field(default=(), repr=False)
    metrics: bool = True
    metrics_require_auth: bool = False
    access_log: str = "off"
    log_bodies: bool = False
    timing_header: bool = False
    include_stream_usage: bool = False  # chat streams ask for the usage chunk unless the client said
    retry: RetryPolicy = field(default_factory=RetryPolicy)



def endpoint_defaults(extra_body: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The extra_body defaults of one endpoint (`/chat/completions`): the shared ones, then its own block's,
    which win."""
    shared = {key: value for key, value in extra_body.items() if key not in ENDPOINT_BLOCKS.values()}
    return {**shared, **extra_body.get(ENDPOINT_BLOCKS[path], {})}
