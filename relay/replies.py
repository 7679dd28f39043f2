"""Responses the relay makes itself. Errors take OpenAI's shape so every client already parses them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import orjson
from starlette.types import Scope, Send

from relay.headers import Header


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


async def send_json(send: Send, status: int, body: bytes, headers: Sequence[Header] = ()) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(
    send: Send,
    status: int,
    message: str,
    type: str = "invalid_request_error",
    code: str | None = None,
    headers: Sequence[Header] = (),
) -> None:
    await send_json(send, status, error_body(message, type, code), headers)


def allow_header(methods: Iterable[str]) -> tuple[Header]:
    return ((b"allow", ", ".join(sorted(methods)).encode()),)


async def send_not_allowed(scope: Scope, send: Send, allow: Sequence[Header]) -> None:
    message = f"{scope['method']} is not allowed on {scope['path']}"
    await send_error(send, 405, message, code="method_not_allowed", headers=allow)
