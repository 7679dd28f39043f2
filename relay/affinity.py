"""A request's conversation key, which keeps a conversation on one upstream (relay.fleet).

In this order: the client's `X-Session-ID` header (what the field's routers read); the body's
`prompt_cache_key` (OpenAI's own routing hint, taken while the body is patched); NeMo Gym's rollout id
(the `/ng-rollout/<id>/` prefix its agents add when observability is on); a session cookie: Gym's own
(`<Server>___<name>`, a signed Starlette session whose payload holds `session_id`) or the relay's
(`routing.session_cookie`, which the relay sets on an answer to a request that named no key, so a
client that returns cookies, as Gym's agents do, stays on one upstream).

The Responses API's `previous_response_id` is not used: knowing which upstream made a response would mean
reading every answer's id and keeping a map of them, and clients that chain responses send one of the
keys above anyway.
"""

from __future__ import annotations

import base64
import binascii
import secrets

import orjson

ROLLOUT_KEY = "relay.rollout"  # the scope key of a NeMo Gym rollout id (the /ng-rollout/<id>/ prefix)
_GYM_COOKIE = b"___"  # Gym names its model servers' session cookies <Class>___<server name>


def from_cookies(header: bytes, own: bytes | None) -> bytes | None:
    """The session a Cookie header carries: the relay's own cookie's value, else a Gym session's id."""
    gym = None
    for pair in header.split(b";"):
        name, _, value = pair.strip().partition(b"=")
        if own is not None and name == own and value:
            return value
        if gym is None and _GYM_COOKIE in name:
            gym = _gym_session(value)
    return gym


def _gym_session(value: bytes) -> bytes | None:
    """The `session_id` in a Starlette session cookie (`<base64 JSON>.<timestamp>.<signature>`). Read, not
    verified: it only chooses an upstream."""
    payload = value.split(b".", 1)[0]
    try:
        session = orjson.loads(base64.b64decode(payload + b"=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return None
    session_id = session.get("session_id") if isinstance(session, dict) else None
    return session_id.encode() if isinstance(session_id, str) and session_id else None


def new_session_cookie(name: bytes) -> tuple[bytes, bytes]:
    """A fresh session key and the Set-Cookie value that hands it to the client."""
    key = secrets.token_hex(16).encode()
    return key, name + b"=" + key + b"; Path=/; HttpOnly; SameSite=Lax"
