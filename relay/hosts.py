"""Which host names the relay answers to: the defence against DNS rebinding.

A web page can rebind its own host name to 127.0.0.1 and then post same-origin requests to the relay;
the browser sends its own name in Host. The relay answers only Hosts it was told about, so such a page
never spends the operator's key. A Host that is an IP address is always accepted: a page can only rebind
a name. Browsers also send Origin with a cross-site POST (relay.intake refuses a foreign one), which
closes the same door for pages that post to 127.0.0.1 directly.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from relay.metrics import refused
from relay.replies import send_error

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_WILDCARD_BINDS = ("", "0.0.0.0", "::")
_CACHE_ENTRIES = 1024


def default_allowed(bind_host: str) -> list[str]:
    """The loopback names, the bind host when it is a name, and the machine's own names when bound to
    every address (names used behind a load balancer must be configured)."""
    names = list(LOOPBACK_NAMES)
    if bind_host in _WILDCARD_BINDS:
        names += [socket.gethostname(), socket.getfqdn()]
    elif not _is_address(bind_host):
        names.append(bind_host)
    return names


class HostNames:
    """`allows(authority)`: whether a Host value (name, optional port) is one of `names`; an entry
    `*.example.com` allows every name under example.com. Verdicts are remembered per raw value."""

    def __init__(self, names: Iterable[str]) -> None:
        cleaned = {name.strip().lower().strip("[]") for name in names}
        self._exact = frozenset(name.encode("idna") for name in cleaned if not name.startswith("*."))
        self._suffixes = tuple(b"." + name[2:].encode("idna") for name in cleaned if name.startswith("*."))
        self._seen: dict[bytes, bool] = {}

    def allows(self, authority: bytes) -> bool:
        verdict = self._seen.get(authority)
        if verdict is None:
            verdict = self._judge(authority)
            if len(self._seen) >= _CACHE_ENTRIES:  # clients choose the values: start over rather than grow
                self._seen.clear()
            self._seen[authority] = verdict
        return verdict

    def _judge(self, authority: bytes) -> bool:
        split = split_authority(authority)
        if split is None:
            return False
        name = split[0]
        return _is_address(name.decode("latin-1")) or name in self._exact or name.endswith(self._suffixes)


class AllowedHosts:
    """The app, for requests whose Host is allowed; 400 `invalid_host` for the rest, never forwarded.
    Checked on every route; a plain callable, so an allowed request costs no coroutine of its own."""

    def __init__(self, app: ASGIApp, names: HostNames) -> None:
        self.app = app
        self.names = names

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        for name, value in scope["headers"]:  # Host comes first from nearly every client
            if name == b"host":
                if self.names.allows(value):
                    return self.app(scope, receive, send)
                break
        return _refuse(send)


async def _refuse(send: Send) -> None:
    refused("invalid_host")
    message = "The relay does not answer for this Host; add the name to allowed_hosts if it is yours"
    await send_error(send, 400, message, code="invalid_host", headers=((b"connection", b"close"),))


def split_authority(value: bytes) -> tuple[bytes, int | None] | None:
    """b"Example.com:8000" -> (b"example.com", 8000); b"[::1]" -> (b"::1", None); None if malformed."""
    value = value.strip().lower()
    if value.startswith(b"["):
        name, bracket, rest = value[1:].partition(b"]")
        if not bracket or (rest and not rest.startswith(b":")):
            return None
        port = rest[1:]
    else:
        name, colon, port = value.partition(b":")
        if colon and not port:
            return None
    if not name or (port and not port.isdigit()):
        return None
    return name, int(port) if port else None


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
