"""Which host names the relay answers to: the defence against DNS rebinding.

A web page can rebind its own host name to 127.0.0.1 and then post same-origin requests to the relay;
the browser sends its own name in Host. The relay answers only Hosts it was told about, so such a page
never spends the operator's key. A Host that is an IP address is always accepted: a page can only rebind
a name. Browsers also send Origin with a cross-site POST (relay.intake refuses a foreign one), which
closes the same door for pages that post to 127.0.0.1 directly.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable

from starlette.types import ASGIApp, Receive, Scope, Send

from relay.host_names import HostNames, is_address
from relay.metrics import refused
from relay.replies import send_error

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_WILDCARD_BINDS = ("", "0.0.0.0", "::")


def default_allowed(bind_host: str) -> list[str]:
    """The loopback names, the bind host when it is a name, and the machine's own names when bound to
    every address (names used behind a load balancer must be configured)."""
    names = list(LOOPBACK_NAMES)
    if bind_host in _WILDCARD_BINDS:
        names += [socket.gethostname(), socket.getfqdn()]
    elif not is_address(bind_host):
        names.append(bind_host)
    return names


class AllowedHosts:
    """The app, for requests whose Host is allowed; 400 `invalid_host` for the rest, never forwarded.
    Checked on every route; a plain callable, so an allowed request costs no coroutine of its own."""

    def __init__(self, app: ASGIApp, names: HostNames) -> None:
        self.app = app
        self.names = names
        self.seen = names.seen  # the verdicts it remembers, looked up here without a call

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        for name, value in scope["headers"]:  # Host comes first from nearly every client
            if name == b"host":
                if self.seen.get(value) or self.names.allows(value):  # most Hosts are seen before
                    return self.app(scope, receive, send)
                break
        return _refuse(send)


async def _refuse(send: Send) -> None:
    refused("invalid_host")
    message = "The relay does not answer for this Host; add the name to allowed_hosts if it is yours"
    await send_error(send, 400, message, code="invalid_host", headers=((b"connection", b"close"),))
