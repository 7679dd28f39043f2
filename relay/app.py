"""Build the ASGI app: a low-level Starlette router of plain ASGI endpoints, and the lifespan that owns
the process's one upstream session.

`uvicorn relay.app:app` works too: `app` is built on first access from $RELAY_CONFIG (default
conf/openai_model.yaml), so importing this module for create_app reads no configuration.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import resource
import sys
from collections.abc import AsyncIterator, Awaitable, Collection
from contextlib import asynccontextmanager
from typing import Any

import aiohttp.abc
import orjson
from starlette.datastructures import URLPath
from starlette.routing import BaseRoute, Match, NoMatchFound, Route, Router, get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from relay.auth import RequireKey
from relay.body import Patcher
from relay.client import Upstream
from relay.config import ConfigError, Settings, load_settings
from relay.metrics import MetricsEndpoint, keep_flushing, metrics
from relay.observe import Observer
from relay.proxy import Proxy
from relay.replies import allow_header, error_body, send_error, send_json, send_not_allowed

log = logging.getLogger("relay")

API_PATHS = ("/chat/completions", "/responses")
HEALTH_PATHS = ("/", "/health", "/healthz", "/livez", "/readyz")
_READ = ("GET", "HEAD")


class Exact(BaseRoute):
    """One exact path. Starlette's Route matches a regex and copies path parameters into the scope on every
    request; the API paths are matched on every relayed request, and a string comparison is enough."""

    def __init__(self, path: str, app: ASGIApp) -> None:
        self.path = path
        self.app = app

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and get_route_path(scope) == self.path:
            return Match.FULL, {}
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **path_params: Any) -> URLPath:
        raise NoMatchFound(name, path_params)

    def handle(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # The router awaits what this returns: the endpoint's own coroutine, one frame fewer for every
        # resumption of a relayed request than awaiting it here.
        return self.app(scope, receive, send)


class Only:
    """Answer other methods with 405 and Allow, in the OpenAI error shape (Starlette's own is plain text)."""

    def __init__(self, methods: Collection[str], app: ASGIApp) -> None:
        self.methods = frozenset(methods)
        self.allow = allow_header(self.methods)
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] in self.methods:
            await self.app(scope, receive, send)
        else:
            await send_not_allowed(scope, send, self.allow)


class Fixed:
    """A JSON body computed once at startup."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, self.body)


class ModelInfo:
    """GET /v1/models/{id}: the one configured model, or 404 as OpenAI answers for an unknown model."""

    def __init__(self, model: dict[str, Any]) -> None:
        self.model_id = model["id"]
        self.body = orjson.dumps(model)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        asked = scope["path_params"]["model_id"]
        if asked == self.model_id:
            await send_json(send, 200, self.body)
            return
        await send_error(send, 404, f"The model '{asked}' does not exist", code="model_not_found")


async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    message = f"Invalid URL ({scope['method']} {scope['path']}): the relay serves POST /v1/chat/completions and POST /v1/responses"
    await send_json(send, 404, error_body(message, "invalid_request_error", code="unknown_url"))


def create_app(settings: Settings, resolver: aiohttp.abc.AbstractResolver | None = None) -> ASGIApp:
    recorder = metrics() if settings.metrics else None
    upstream = Upstream(settings, resolver)

    def flush_metrics() -> None:
        if recorder is not None:
            recorder.flush(upstream.slots.in_flight, upstream.slots.waiting)

    patcher = Patcher(settings.openai_model, settings.extra_body, settings.offload_body_bytes)
    model = {"id": settings.openai_model, "object": "model", "created": 0, "owned_by": "relay"}
    healthy = Fixed(orjson.dumps({"status": "ok"}))
    # The API paths come first: the router tries routes in order. Proxy answers methods other than POST.
    routes: list[BaseRoute] = [
        *(Exact(f"/v1{path}", Proxy(upstream, path, patcher, _observer(path, settings))) for path in API_PATHS),
        Exact("/v1/models", Only(_READ, Fixed(orjson.dumps({"object": "list", "data": [model]})))),
        Route("/v1/models/{model_id:path}", Only(_READ, ModelInfo(model))),
        *(Exact(path, Only(_READ, healthy)) for path in HEALTH_PATHS),
    ]
    if settings.metrics:
        routes.append(Exact("/metrics", Only(_READ, MetricsEndpoint(flush_metrics))))

    @asynccontextmanager
    async def lifespan(_: object) -> AsyncIterator[None]:
        logging.getLogger("uvicorn.error").addFilter(_deliberate_abort)
        _raise_open_file_limit()
        _tune_garbage_collector()
        await upstream.open()
        flushing = asyncio.create_task(keep_flushing(flush_metrics)) if recorder is not None else None
        log.info(
            "relay: POST /v1/chat/completions and /v1/responses -> %s as model %s (in-flight cap: %s%s)",
            upstream.base_url,
            settings.openai_model,
            settings.max_concurrent_requests or "unlimited",
            ", client keys required" if settings.relay_api_keys else "",
        )
        try:
            yield
        finally:
            if flushing is not None:
                flushing.cancel()
            await upstream.close()
            patcher.close()
            flush_metrics()  # the last requests, into the files other workers' scrapes read

    app: ASGIApp = Router(routes, redirect_slashes=False, default=not_found, lifespan=lifespan)
    if settings.relay_api_keys:
        open_paths = HEALTH_PATHS if settings.metrics_require_auth else (*HEALTH_PATHS, "/metrics")
        app = RequireKey(app, settings.relay_api_keys, open_paths)
    return app


def _observer(path: str, settings: Settings) -> Observer | None:
    if not settings.metrics and settings.access_log == "off":
        return None
    endpoint = path.strip("/").replace("/", ".")
    return Observer(endpoint, metrics() if settings.metrics else None, settings.access_log)


def _deliberate_abort(record: logging.LogRecord) -> bool:
    # The relay cuts a client's connection on purpose when the upstream fails mid-body (so the client
    # sees the truncation) and has logged why; uvicorn's own ERROR line for it would only alarm.
    return record.getMessage() != "ASGI callable returned without completing response."


def _tune_garbage_collector() -> None:
    """Keep the cyclic garbage collector off the hot path.

    With dozens of requests in flight, the objects they hold alive are enough to cross CPython's default
    threshold of 700 tracked allocations again and again, so the collector kept walking live requests:
    about a fifth of the relay's CPU in `make bench`. Relayed requests create next to no cyclic garbage
    (reference counting frees them); failed ones do (exceptions and their tracebacks), which the high
    threshold lets pile up to a bounded plateau (+14 MiB in the soak with 10% faults). Freezing what
    startup created keeps the rare full collection from walking the imported modules.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _raise_open_file_limit() -> None:
    """Each relayed request holds two sockets; thousands of streams need more than the usual 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("relay: could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    log.info("relay: open-file limit %d", soft)


@functools.cache
def _app_from_environment() -> ASGIApp:
    # Under the plain uvicorn CLI nothing configures the relay's logger: it writes through uvicorn's.
    relay_log = logging.getLogger("relay")
    if not relay_log.handlers:
        relay_log.handlers = logging.getLogger("uvicorn.error").handlers
        relay_log.setLevel(logging.getLogger("uvicorn.error").getEffectiveLevel())
        relay_log.propagate = False
    try:
        return create_app(load_settings())
    except ConfigError as exc:
        print(f"relay: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def __getattr__(name: str) -> Any:
    if name == "app":
        return _app_from_environment()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
