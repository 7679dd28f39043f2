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

import aiohttp.abc
import orjson
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Route, Router
from starlette.types import ASGIApp

from relay.attempts import Attempts
from relay.auth import RequireKey
from relay.body import Rules
from relay.config import BIND_HOST_ENV, ConfigError, load_settings
from relay.failures import Failures
from relay.host_names import HostNames
from relay.hosts import AllowedHosts, default_allowed
from relay.intake import Intake
from relay.lifespan import lifespan
from relay.logs import attach_to_uvicorn
from relay.metrics import MetricsEndpoint, metrics
from relay.observe import Observer
from relay.patcher import Helper, Patcher
from relay.proxy import Proxy
from relay.relaying import ResponseRelay
from relay.retry import Retrier
from relay.routes import AllowMethods, ExactPath, ModelInfo, StaticJSON, not_found
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
    upstream = Upstream(settings.openai_base_url, settings.openai_api_key, settings, resolver)
    slots = Slots(settings.max_concurrent_requests)
    recorder = metrics() if settings.metrics else None
    flush_metrics = (lambda: recorder.flush(slots.in_flight, slots.waiting)) if recorder is not None else None
    allowed = None if "*" in settings.allowed_hosts else HostNames(settings.allowed_hosts or default_allowed(bind_host or settings.host))
    helper = Helper()
    failures = Failures(settings.connect_timeout, settings.read_timeout, settings.total_timeout)
    retrier = Retrier(settings.retry)

    def proxy(path: str) -> Proxy:
        full_path = f"/v1{path}"
        observer = _observer(path, settings)
        rules = Rules(
            settings.openai_model,
            endpoint_defaults(settings.extra_body, path),
            stream_usage=settings.include_stream_usage and path == "/chat/completions",
        )
        patcher = Patcher(rules, settings.offload_body_bytes, helper)
        redact = settings.openai_api_key if settings.log_bodies else None
        intake = Intake(full_path, patcher, settings.max_request_bytes, settings.request_body_timeout, allowed, redact)
        endpoint = upstream.endpoint(path)
        attempts = Attempts(full_path, endpoint, slots, retrier, failures, observer, settings.retry_stale_connections)
        relay = ResponseRelay(full_path, observer, settings.timing_header)
        return Proxy(full_path, settings, intake, attempts, relay, failures, observer)

    model = {"id": settings.openai_model, "object": "model", "created": 0, "owned_by": "relay"}
    healthy = StaticJSON(orjson.dumps({"status": "ok"}))
    # The API paths come first: the router tries routes in order. Proxy answers methods other than POST.
    routes: list[BaseRoute] = [
        *(ExactPath(f"/v1{path}", proxy(path)) for path in API_PATHS),
        ExactPath("/v1/models", AllowMethods(_READ, StaticJSON(orjson.dumps({"object": "list", "data": [model]})))),
        Route("/v1/models/{model_id:path}", AllowMethods(_READ, ModelInfo(model))),
        *(ExactPath(path, AllowMethods(_READ, healthy)) for path in HEALTH_PATHS),
    ]
    if flush_metrics is not None:
        routes.append(ExactPath("/metrics", AllowMethods(_READ, MetricsEndpoint(flush_metrics))))
    summary = (
        f"relay: POST /v1/chat/completions and /v1/responses -> {upstream.base_url} as model {settings.openai_model} "
        f"(in-flight cap: {settings.max_concurrent_requests or 'unlimited'}"
        f"{', client keys required' if settings.relay_api_keys else ''})"
    )
    # Middleware inside the Router: plain callables that return the next app's coroutine, so they cost no
    # coroutine frame of their own (uvicorn would take a plain callable at the top for ASGI 2).
    middleware = []
    if allowed is not None:
        middleware.append(Middleware(AllowedHosts, allowed))
    if settings.relay_api_keys:
        open_paths = HEALTH_PATHS if settings.metrics_require_auth else (*HEALTH_PATHS, "/metrics")
        middleware.append(Middleware(RequireKey, settings.relay_api_keys, open_paths))
    return Router(
        routes,
        redirect_slashes=False,
        default=not_found,
        lifespan=lifespan([upstream.open], [upstream.close, helper.close], flush_metrics, summary),
        middleware=middleware,
    )


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
