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


# What `max_http_attempts` (openai_model's key: attempts in all) retries. Gym retries 404, 408, 429, 500,
# 502, 503, 504 and 520; the relay leaves out 404 (a wrong URL or model name does not heal, and each retry
# only delays the error the client must see) and 500 (a model server's 500 is mostly this request failing
# the same way each time, and a retry runs a whole generation again).
GYM_RETRY_STATUSES = frozenset({408, 429, 502, 503, 504, 520})


@dataclass(frozen=True)
class UpstreamSpec:
    """One entry of `openai_base_url`."""

    url: str
    api_key: str | None = field(default=None, repr=False)  # None: openai_api_key
    weight: int = 1
    max_concurrent_requests: int | None = None  # this upstream's own cap, within the process's


@dataclass(frozen=True)
class Routing:
    """How requests spread over several upstreams (relay.fleet); with one upstream, only health counts."""

    affinity: str = "auto"  # auto: a conversation's requests go to one upstream; none: balance only
    balance: str = "least_in_flight"  # or round_robin (weighted)
    load_factor: float = 1.25  # bounded load: no upstream above this times its share of what is in flight
    failover: bool = True  # a failure before the answer goes to another upstream, once per upstream
    failover_statuses: frozenset[int] = frozenset({502, 503})
    eject_after: int = 3  # failures in a row that eject an upstream
    eject_seconds: float = 2.0  # the first ejection; doubles each time it fails again, up to:
    max_eject_seconds: float = 60.0
    probe_interval: float | None = None  # seconds between active probes; None: answers only
    probe_path: str = "/models"  # under each base URL
    session_cookie: str | None = None  # a cookie the relay sets and reads as the conversation's key


@dataclass(frozen=True)
class Cluster:
    """Limits shared through one Redis by every relay process that names the same `name` (relay.cluster)."""

    redis_url: str = field(default="", repr=False)  # required; may carry a password
    name: str = ""  # required: the key namespace, so several jobs can share one Redis
    max_concurrent_requests: int | None = None  # in flight across every process of the cluster
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # charged from each answer's usage
    on_redis_error: str = "local"  # local: each process keeps an even share of the limits; fail: 503
    lease_seconds: float = 10.0  # a slot of a process that died comes back after this
    max_wait_seconds: float = 60.0  # longest wait for a slot or for budget; then 503 or 429
    burst_seconds: float = 1.0  # the budgets' tolerance: this many seconds' worth may go at once
    default_max_tokens: int = 1024  # the token estimate of a request that sets no max_*tokens
    redis_timeout: float = 0.5  # every Redis call; a slower Redis counts as unreachable
    fallback_processes: int | None = None  # what the limits are shared by while Redis is unreachable

    @property
    def rates(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


@dataclass(frozen=True)
class Settings:
    openai_base_url: str | tuple[UpstreamSpec, ...]
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
    routing: Routing = field(default_factory=Routing)
    # NeMo Gym's keys (relay.gym_layout): the model server's name (in Gym, its top-level key), named in
    # capture records; its processes (`relay serve --workers` wins); openai_model's rewrite of Responses
    # input; Gym's per-rollout capture of each model call (relay.capture), and the relay's cap on what
    # one call's capture holds in memory.
    name: str | None = None
    num_workers: int | None = None
    drop_input_reasoning_items: bool = False
    observability_enabled: bool = False
    model_call_capture_dir: str | None = None
    model_call_capture_max_bytes: int = 8 * 1024 * 1024

    @property
    def capture_dir(self) -> str | None:
        """Where capture records go, or None when capture is off."""
        return self.model_call_capture_dir if self.observability_enabled else None
    cluster: Cluster | None = None  # cluster-wide limits on Redis; None: per-process limits only

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every key the relay holds (upstream keys, client keys): what no log line may show."""
        upstream_keys = (spec.api_key for spec in self.upstreams if spec.api_key)
        return tuple(dict.fromkeys((self.openai_api_key, *upstream_keys, *self.relay_api_keys)))

    @property
    def upstreams(self) -> tuple[UpstreamSpec, ...]:
        """`openai_base_url` as entries: a single URL is one entry."""
        if isinstance(self.openai_base_url, str):
            return (UpstreamSpec(self.openai_base_url),)
        return self.openai_base_url


def endpoint_defaults(extra_body: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The extra_body defaults of one endpoint (`/chat/completions`): the shared ones, then its own block's,
    which win."""
    shared = {key: value for key, value in extra_body.items() if key not in ENDPOINT_BLOCKS.values()}
    return {**shared, **extra_body.get(ENDPOINT_BLOCKS[path], {})}
