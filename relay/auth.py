"""Optional inbound auth: with relay_api_keys set, clients must send `Authorization: Bearer <a key>`.

The client's key is checked here and goes no further: the proxy never forwards a client's Authorization.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Collection

from starlette.types import ASGIApp, Receive, Scope, Send

from relay.metrics import refused
from relay.paths import route_path
from relay.replies import send_error

_CHALLENGE = ((b"www-authenticate", b"Bearer"),)


class RequireKey:
    """The app, for requests with a valid key or on an open path; 401 for the rest. A plain callable in the
    Router's middleware: an allowed request costs no coroutine of its own."""

    def __init__(self, app: ASGIApp, keys: Collection[str], open_paths: Collection[str]) -> None:
        self.app = app
        self.keys = tuple(key.encode() for key in keys)
        self.open_paths = frozenset(open_paths)

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] != "http" or route_path(scope) in self.open_paths or self._allowed(scope["headers"]):
            return self.app(scope, receive, send)
        return _refuse(send)

    def _allowed(self, headers: list[tuple[bytes, bytes]]) -> bool:
        token = b""
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    token = b""
                break
        # Compare with every key, without stopping at a match, so timing tells nothing about which.
        token, matched = token.strip(), False
        for key in self.keys:
            matched |= hmac.compare_digest(token, key)
        return matched


async def _refuse(send: Send) -> None:
    refused("invalid_api_key")
    message = "Incorrect or missing API key for this relay: send Authorization: Bearer <one of relay_api_keys>"
    await send_error(send, 401, message, code="invalid_api_key", headers=_CHALLENGE)
