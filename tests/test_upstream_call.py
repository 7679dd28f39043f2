"""The aiohttp layer alone, with aioresponses in place of the network: the request the relay's one
session makes carries the configured credentials and default headers and a JSON content type, and a
redirect from the upstream goes back to the client instead of being followed (the key would go along).

Everything else about the relay is tested over real sockets; this only looks at what aiohttp is asked.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import orjson
from aiohttp import ClientResponse
from aioresponses import aioresponses
from multidict import CIMultiDict
from yarl import URL

from tests.servers import API_KEY, MODEL
from relay.body import Patcher
from relay.client import Upstream
from relay.config import Settings
from relay.proxy import Proxy

# Loopback with a port nobody serves: if the mock ever let a request through, it would fail fast, locally.
BASE = "http://127.0.0.1:9/v1"
ELSEWHERE = "http://127.0.0.1:9/elsewhere"


class MockedResponse(ClientResponse):
    """aioresponses 0.7.9 builds responses without the `stream_writer` that aiohttp 3.14 requires
    (pnuckowski/aioresponses#289); a finished upload of size 0 stands in for it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(*args, **kwargs)


def settings() -> Settings:
    return Settings(
        openai_base_url=BASE + "/",
        openai_api_key=API_KEY,
        openai_model=MODEL,
        openai_default_headers={"OpenAI-Organization": "org-configured"},
    )


async def call_proxy(client_headers: list[tuple[bytes, bytes]], body: bytes) -> list[dict[str, Any]]:
    """Run the relay's endpoint as an ASGI app on one request; return what it sent to the client."""
    upstream = Upstream(settings())
    await upstream.open()
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await never.wait()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": client_headers, "query_string": b""}
    try:
        patcher = Patcher(MODEL, {}, None)
        await asyncio.wait_for(Proxy(upstream, "/chat/completions", patcher, None)(scope, receive, send), timeout=10)
    finally:
        await upstream.close()
    return sent


def test_session_sends_configured_headers_and_does_not_follow_redirects() -> None:
    client_headers = [
        (b"content-type", b"application/json"),
        (b"authorization", b"Bearer client-key"),
        (b"openai-organization", b"org-of-the-client"),
    ]
    with aioresponses() as mocked:
        redirect = {"status": 307, "headers": {"Location": ELSEWHERE}, "body": b""}
        mocked.post(f"{BASE}/chat/completions", response_class=MockedResponse, **redirect)
        # Were the redirect followed, this would answer (and be recorded) instead of the 307 reaching the client.
        for method in (mocked.post, mocked.get):
            method(ELSEWHERE, status=200, body=b"{}", repeat=True, response_class=MockedResponse)
        sent = asyncio.run(call_proxy(client_headers, b'{"model": "client-model", "messages": []}'))
        calls = dict(mocked.requests)

    assert list(calls) == [("POST", URL(f"{BASE}/chat/completions"))]  # one request, nothing to ELSEWHERE
    (call,) = calls[("POST", URL(f"{BASE}/chat/completions"))]
    assert call.kwargs["allow_redirects"] is False
    headers = CIMultiDict(call.kwargs["headers"])
    assert headers.getall("Authorization") == [f"Bearer {API_KEY}"]  # the relay's key, not the client's
    assert headers.getall("OpenAI-Organization") == ["org-configured"]
    assert headers.getall("Content-Type") == ["application/json"]
    assert orjson.loads(call.kwargs["data"])["model"] == MODEL

    start = sent[0]
    assert start["type"] == "http.response.start" and start["status"] == 307
    assert (b"location", ELSEWHERE.encode()) in start["headers"]
