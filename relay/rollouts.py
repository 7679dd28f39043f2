"""NeMo Gym's rollout prefix: its agents call the model server at `/ng-rollout/<id>/v1/responses` (and
`/ng-rollout/<id>/training-token-capture/v1/...`) when observability is on, and any route may come under
it (`GET /ng-rollout/<id>/` is a health check). The prefix is stripped, never forwarded; the id goes into
the scope under relay.affinity.ROLLOUT_KEY (the access log's `rollout_id`, a fleet's conversation key)
and, with capture on, names the capture file (relay.capture).

This is the router's default, reached only when no exact route matched: unprefixed requests never pass
here, so they pay nothing for it.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from starlette.types import Receive, Scope, Send

from relay.affinity import ROLLOUT_KEY
from relay.capture import DIALECTS, CaptureStore
from relay.replies import error_body, send_json
from relay.paths import route_path
from relay.routes import not_found

PREFIX = "/ng-rollout/"
TOKEN_CAPTURE = "/training-token-capture"  # Gym's training token-id capture; hosted APIs return no token ids
# Gym's rule for rollout ids; bounded because the id becomes a file name (<id>.capture.incomplete).
_ROLLOUT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")

Dispatch = Callable[[Scope, Receive, Send], Awaitable[None]]


def split(path: str) -> tuple[str, str] | None:
    """(rollout id, the path below the prefix) of `/ng-rollout/<id>/...`; None if the prefix is malformed."""
    rollout_id, slash, rest = path[len(PREFIX) :].partition("/")
    if not slash or not _ROLLOUT_ID.fullmatch(rollout_id):
        return None
    rest = "/" + rest
    if rest.startswith(TOKEN_CAPTURE + "/"):
        rest = rest[len(TOKEN_CAPTURE) :]
    return rollout_id, rest


class RolloutPrefix:
    """The router's default: a prefixed request goes through the router again without its prefix (teed
    into the capture store when it is an API call and capture is on); anything else is a 404."""

    def __init__(self, capture: CaptureStore | None) -> None:
        self.capture = capture
        self.dispatch: Dispatch | None = None  # the router's own dispatch, set once the router exists

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope) if scope["type"] == "http" else ""
        if not path.startswith(PREFIX) or ROLLOUT_KEY in scope:
            await not_found(scope, receive, send)
            return
        parts = split(path)
        if parts is None:
            message = (
                f"Invalid URL ({scope['method']} {scope['path']}): a NeMo Gym rollout prefix is /ng-rollout/<id>/ "
                "with an id of letters, digits, '.', '_' and '-' that starts with a letter or digit"
            )
            await send_json(send, 404, error_body(message, "invalid_request_error", code="unknown_url"))
            return
        rollout_id, rest = parts
        assert self.dispatch is not None
        full = scope.get("root_path", "") + rest
        inner = {**scope, "path": full, "raw_path": full.encode(), ROLLOUT_KEY: rollout_id}
        dialect = DIALECTS.get(rest)
        if self.capture is not None and dialect is not None and scope["method"] == "POST":
            await self.capture.serve(self.dispatch, inner, receive, send, rollout_id, dialect)
        else:
            await self.dispatch(inner, receive, send)
