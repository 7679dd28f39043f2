"""What the benchmark sends: request bodies of about 1 KB, the fake upstream's directives, the URLs.

Requests name the model the relay is configured with, so the upstream's answer is byte-for-byte the
same whether the request came through the relay (which rewrites `model`) or straight from the client.
"""

from __future__ import annotations

from typing import Any

import orjson

MODEL = "bench-model"
ENDPOINTS = {"chat": "/v1/chat/completions", "responses": "/v1/responses"}
REQUEST_BYTES = 1024
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench-client"}
_FILLER = "Summarise the following notes for a colleague who missed the meeting. "


def _padded(build: Any, size: int = REQUEST_BYTES) -> dict[str, Any]:
    overhead = len(orjson.dumps(build("")))
    text = (_FILLER * (size // len(_FILLER) + 1))[: max(0, size - overhead)]
    return build(text)


def _chat(text: str) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": text},
        ],
        "temperature": 0.7,
        "max_tokens": 256,
    }


def _responses(text: str) -> dict[str, Any]:
    return {"model": MODEL, "instructions": "You are a concise assistant.", "input": text, "temperature": 0.7}


_BUILDERS = {"chat": _chat, "responses": _responses}
_BODIES = {endpoint: _padded(build) for endpoint, build in _BUILDERS.items()}


def body(endpoint: str, stream: bool = False) -> bytes:
    payload = dict(_BODIES[endpoint])
    if stream:
        payload["stream"] = True
    return orjson.dumps(payload)


def sized_body(endpoint: str, size: int) -> bytes:
    """A non-stream request of `size` bytes (one long user text): the big-body case, built on demand."""
    return orjson.dumps(_padded(_BUILDERS[endpoint], size))


def headers(events: int | None = None, delay_ms: float = 0, event_delay_ms: float = 0) -> dict[str, str]:
    """The client's headers plus the fake upstream's directives, which the relay forwards end to end."""
    out = dict(HEADERS)
    if events is not None:
        out["x-fake-events"] = str(events)
    if delay_ms:
        out["x-fake-delay-ms"] = f"{delay_ms:g}"
    if event_delay_ms:
        out["x-fake-event-delay-ms"] = f"{event_delay_ms:g}"
    return out


def url(port: int, endpoint: str) -> str:
    return f"http://127.0.0.1:{port}{ENDPOINTS[endpoint]}"
