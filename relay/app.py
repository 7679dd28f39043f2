"""Build the ASGI app: a low-level Starlette router of plain ASGI endpoints, wired from one Settings.

`uvicorn relay.app:app` works too: `app` is built on first access (PEP 562) from $RELAY_CONFIG (default
conf/openai_model.yaml), so importing this module for create_app reads no configuration. (uvicorn's
--factory would do the same, but changes the command users type.)
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any

from collections.abc import Callable, Coroutine
from typing import NamedTuple

import aiohttp.abc
import orjson
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Route, Router
from starlette.types import ASGIApp

from relay.attempts import Attempts
from relay.auth import RequireKey
from relay.body import Rules
from relay.capture import CaptureStore
from relay.cluster import ClusterLimits, Gate, build
from relay.config import BIND_HOST_ENV, ConfigError, load_settings
from relay.failures import Failures
from relay.host_names import HostNames
from relay.hosts import AllowedHosts, default_allowed
from relay.intake import Intake
from relay.lifespan import lifespan
from relay.logs import attach_to_uvicorn
from relay.fleet import Fleet, Member
from relay.health import Health
from relay.metrics import Metrics, MetricsEndpoint, keep_flushing, metrics
from relay.observe import Observer
from relay.patcher import Helper, Patcher
from relay.proxy import Proxy
from relay.relaying import ResponseRelay
from relay.retry import Retrier
from relay.probe import keep_probing
from relay.rollouts import RolloutPrefix
from relay.routes import HEALTHY, AllowMethods, ExactPath, ModelInfo, Readiness, StaticJSON, UpstreamsView
from relay.seams import SeamError, check
from relay.settings import Settings, endpoint_defaults
from relay.slots import Slots
from relay.upstream import Upstream

log = logging.getLogger("relay")

API_PATHS = ("/chat/completions", "/responses")
HEALTH_PATHS = ("/", "/health", "/healthz", "/livez", "/readyz")
_READ = ("GET", "HEAD")


def create_app(settings: Settings, resolver: aiohttp.abc.AbstractResolver | None = None, bind_host: str | None = None) -> ASGIApp:
    check()
    fleet = _fleet(settings, resolver)
    slots = Slots(settings.max_concurrent_requests)
    cluster = build(settings.cluster, settings.metrics) if settings.cluster is not None else None
    recorder = metrics() if settings.metrics else None
    flush_metrics = _flusher(recorder, slots, fleet, cluster)
    allowed = None if "*" in settings.allowed_hosts else HostNames(settings.allowed_hosts or default_allowed(bind_host or settings.host))
    helper = Helper()
    retrier = Retrier(settings.retry, failover=len(fleet.members) > 1)
    shared = _Shared(settings, fleet, slots, retrier, helper, allowed, cluster.gate if cluster is not None else None)
    model = {"id": settings.openai_model, "object": "model", "created": 0, "owned_by": "relay"}
    healthy = StaticJSON(HEALTHY)
    # The API paths come first: the router tries routes in order. Proxy answers methods other than POST.
    routes: list[BaseRoute] = [
        *(ExactPath(f"/v1{path}", _proxy(path, shared)) for path in API_PATHS),
        ExactPath("/v1/models", AllowMethods(_READ, StaticJSON(orjson.dumps({"object": "list", "data": [model]})))),
        Route("/v1/models/{model_id:path}", AllowMethods(_READ, ModelInfo(model))),
        ExactPath("/readyz", AllowMethods(_READ, Readiness(fleet))),
        ExactPath("/health/upstreams", AllowMethods(_READ, UpstreamsView(fleet))),
        *(ExactPath(path, AllowMethods(_READ, healthy)) for path in HEALTH_PATHS if path != "/readyz"),
    ]
    tasks: list[Callable[[], Coroutine[Any, Any, None]]] = []
    if flush_metrics is not None:
        routes.append(ExactPath("/metrics", AllowMethods(_READ, MetricsEndpoint(flush_metrics))))
        tasks.append(functools.partial(keep_flushing, flush_metrics))
    routing = settings.routing
    if routing.probe_interval is not None:
        probe_timeout = min(routing.probe_interval, settings.connect_timeout or 10.0)
        tasks.append(functools.partial(keep_probing, fleet.members, routing.probe_path, routing.probe_interval, probe_timeout))
    upstreams = [member.upstream for member in fleet.members]
    summary = (
        f"relay: POST /v1/chat/completions and /v1/responses -> {', '.join(u.base_url for u in upstreams)} as model "
        f"{settings.openai_model} (in-flight cap: {settings.max_concurrent_requests or 'unlimited'}"
        f"{', client keys required' if settings.relay_api_keys else ''}{_cluster_summary(settings)})"
    )
    capture = None
    if settings.capture_dir is not None:
        capture = CaptureStore(settings.capture_dir, settings.name, settings.model_call_capture_max_bytes, settings.max_request_bytes)
        summary += f"; model calls under /ng-rollout/<id>/ captured to {settings.capture_dir}"
    opens = [u.open for u in upstreams]
    closes = [*(u.close for u in upstreams), helper.close, *((capture.close,) if capture else ())]
    if cluster is not None:
        opens.append(cluster.keeper.open)
        closes.append(cluster.keeper.close)
        tasks += cluster.keeper.tasks()
    prefixed = RolloutPrefix(capture)
    router = Router(
        routes,
        redirect_slashes=False,
        default=prefixed,
        lifespan=lifespan(opens, closes, tasks, flush_metrics, summary),
        middleware=_middleware(settings, allowed),
    )
    prefixed.dispatch = router.app  # past the middleware, which has seen the request already
    return router


class _Shared(NamedTuple):
    """What every endpoint's Proxy shares in one process."""

    settings: Settings
    fleet: Fleet
    slots: Slots
    retrier: Retrier
    helper: Helper
    allowed: HostNames | None
    cluster: Gate | None


def _proxy(path: str, shared: _Shared) -> Proxy:
    settings = shared.settings
    full_path = f"/v1{path}"
    observer = _observer(path, settings)
    affinity = shared.fleet.affinity
    rules = Rules(
        settings.openai_model,
        endpoint_defaults(settings.extra_body, path),
        drop_reasoning_items=settings.drop_input_reasoning_items and path == "/responses",  # as openai_model
        stream_usage=settings.include_stream_usage and path == "/chat/completions",
        cache_key=affinity,
    )
    patcher = Patcher(rules, settings.offload_body_bytes, shared.helper)
    redact = settings.secrets if settings.log_bodies else None
    intake = Intake(
        full_path, patcher, settings.max_request_bytes, settings.request_body_timeout, shared.allowed, redact,
        affinity, settings.routing.session_cookie,
    )  # fmt: skip
    failures = Failures(settings.connect_timeout, settings.read_timeout, settings.total_timeout)
    attempts = Attempts(
        full_path, shared.fleet, shared.slots, shared.retrier, failures, observer, settings.retry_stale_connections,
        settings.routing, shared.cluster,
    )  # fmt: skip
    relay = ResponseRelay(full_path, observer, settings.timing_header)
    return Proxy(full_path, settings, intake, attempts, relay, failures, observer)


def _flusher(recorder: Metrics | None, slots: Slots, fleet: Fleet, cluster: ClusterLimits | None) -> Callable[[], None] | None:
    """What hands this process's plain counts to prometheus-client (at each flush and each scrape)."""
    if recorder is None:
        return None
    if cluster is None:
        return lambda: recorder.flush(slots.in_flight, slots.waiting, fleet)

    def flush() -> None:
        recorder.flush(slots.in_flight, slots.waiting, fleet)
        cluster.flush()

    return flush


def _cluster_summary(settings: Settings) -> str:
    """The cluster's name and limits for the start-up line; never its redis_url (it may hold a password)."""
    cluster = settings.cluster
    if cluster is None:
        return ""
    limits = (
        ("in flight", cluster.max_concurrent_requests),
        ("requests/min", cluster.requests_per_minute),
        ("tokens/min", cluster.tokens_per_minute),
    )
    shown = ", ".join(f"{what} {value}" for what, value in limits if value is not None)
    return f"; cluster {cluster.name}: {shown} on Redis"


def _fleet(settings: Settings, resolver: aiohttp.abc.AbstractResolver | None) -> Fleet:
    routing = settings.routing
    members = []
    for spec in settings.upstreams:
        upstream = Upstream(spec.url, spec.api_key or settings.openai_api_key, settings, resolver)
        health = Health(routing.eject_after, routing.eject_seconds, routing.max_eject_seconds)
        endpoints = {path: upstream.endpoint(path) for path in API_PATHS}
        cap = Slots(spec.max_concurrent_requests) if spec.max_concurrent_requests else None
        members.append(Member(upstream, endpoints, health, cap, spec.weight))
    return Fleet(members, routing)


def _middleware(settings: Settings, allowed: HostNames | None) -> list[Middleware]:
    """Inside the Router: plain callables that return the next app's coroutine, so they cost no coroutine
    frame of their own (uvicorn would take a plain callable at the top for ASGI 2)."""
    middleware = []
    if allowed is not None:
        middleware.append(Middleware(AllowedHosts, allowed))
    if settings.relay_api_keys:
        open_paths = HEALTH_PATHS if settings.metrics_require_auth else (*HEALTH_PATHS, "/metrics", "/health/upstreams")
        middleware.append(Middleware(RequireKey, settings.relay_api_keys, open_paths))
    return middleware


def _observer(path: str, settings: Settings) -> Observer:
    if not settings.metrics and settings.access_log == "off":
        return Observer.silent()
    endpoint = path.strip("/").replace("/", ".")
    return Observer(endpoint, metrics() if settings.metrics else None, settings.access_log, settings.openai_model)


@functools.cache
def _app_from_environment() -> ASGIApp:
    attach_to_uvicorn()
    try:
        return create_app(load_settings(), bind_host=os.environ.get(BIND_HOST_ENV))
    except ConfigError as exc:
        print(f"relay: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except SeamError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def __getattr__(name: str) -> Any:
    if name == "app":
        return _app_from_environment()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
