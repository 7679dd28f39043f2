"""Build the ASGI app: a low-level Starlette router of plain ASGI endpoints, and the lifespan that owns
the process's one upstream session.

`uvicorn relay.app:app` works too: `app` is built on first access from $RELAY_CONFIG (default
conf/openai_model.yaml), so importing this module for create_app reads no configuration.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from typing import Any

import orjson
from starlette.routing import Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from relay.client import Upstream
from relay.config import ConfigError, Settings, load_settings
from relay.proxy import Proxy
from relay.replies import error_body, send_error, send_json

log = logging.getLogger("relay")

API_PATHS = ("/chat/completions", "/responses")
HEALTH_PATHS = ("/", "/health", "/healthz", "/livez", "/readyz")
_READ = ("GET", "HEAD")


class Only:
    """Answer other methods with 405 and Allow, in the OpenAI error shape (Starlette's own is plain text)."""

    def __init__(self, methods: Collection[str], app: ASGIApp) -> None:
        self.methods = frozenset(methods)
        self.allow = ((b"allow", ", ".join(sorted(self.methods)).encode()),)
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] in self.methods:
            await self.app(scope, receive, send)
            return
        message = f"{scope['method']} is not allowed on {scope['path']}"
        await send_error(send, 405, message, code="method_not_allowed", headers=self.allow)


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


def create_app(settings: Settings) -> Router:
    upstream = Upstream(settings)
    model = {"id": settings.openai_model, "object": "model", "created": 0, "owned_by": "relay"}
    healthy = Fixed(orjson.dumps({"status": "ok"}))
    routes = [
        *(Route(f"/v1{path}", Only(("POST",), Proxy(upstream, path))) for path in API_PATHS),
        Route("/v1/models", Only(_READ, Fixed(orjson.dumps({"object": "list", "data": [model]})))),
        Route("/v1/models/{model_id:path}", Only(_READ, ModelInfo(model))),
        *(Route(path, Only(_READ, healthy)) for path in HEALTH_PATHS),
    ]

    @asynccontextmanager
    async def lifespan(_: object) -> AsyncIterator[None]:
        await upstream.open()
        cap = settings.max_concurrent_requests or "unlimited"
        log.info(
            "relay: POST /v1/chat/completions and /v1/responses -> %s as model %s (in-flight cap: %s)",
            upstream.base_url,
            settings.openai_model,
            cap,
        )
        try:
            yield
        finally:
            await upstream.close()

    return Router(routes, redirect_slashes=False, default=not_found, lifespan=lifespan)


@functools.cache
def _app_from_environment() -> Router:
    try:
        return create_app(load_settings())
    except ConfigError as exc:
        print(f"relay: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def __getattr__(name: str) -> Any:
    if name == "app":
        return _app_from_environment()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
