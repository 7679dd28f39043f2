"""The app's small endpoints and route types: plain ASGI callables inside a low-level Starlette Router."""

from __future__ import annotations

from collections.abc import Awaitable, Collection
from typing import Any

import orjson
from starlette.datastructures import URLPath
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import ASGIApp, Receive, Scope, Send

from relay.fleet import Fleet
from relay.paths import route_path
from relay.replies import allow_header, error_body, send_error, send_json, send_not_allowed

HEALTHY = orjson.dumps({"status": "ok"})  # what the health paths answer while the process is up


class ExactPath(BaseRoute):
    """One exact path. Starlette's Route matches a regex and copies path parameters into the scope on every
    request; the API paths are matched on every relayed request, and a string comparison is enough."""

    def __init__(self, path: str, app: ASGIApp) -> None:
        self.path = path
        self.app = app

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and route_path(scope) == self.path:
            return Match.FULL, {}
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **path_params: Any) -> URLPath:
        raise NoMatchFound(name, path_params)

    def handle(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # The router awaits what this returns: the endpoint's own coroutine, one frame fewer for every
        # resumption of a relayed request than awaiting it here.
        return self.app(scope, receive, send)


class AllowMethods:
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


class StaticJSON:
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


class Readiness:
    """GET /readyz: 200 while some upstream can be sent to; 503 naming each upstream's state when none can
    (all ejected after failing in a row, or failing the active probe). /livez, /health and / only say
    that the process is up."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fleet.ready():
            await send_json(send, 200, HEALTHY)
            return
        states = "; ".join(
            f"{u['upstream']} {u['state']} ({u['failures_in_a_row']} failures in a row, last: {u['last_error'] or 'probe'})"
            for u in self.fleet.view()
        )
        await send_error(send, 503, f"no upstream can be reached: {states}", type="upstream_error", code="upstream_unavailable")


class UpstreamsView:
    """GET /health/upstreams: each upstream's state, in flight, failures, ejection."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, orjson.dumps({"ready": self.fleet.ready(), "upstreams": self.fleet.view()}))
