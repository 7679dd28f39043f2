"""max_concurrent_requests caps the upstream requests in flight; without it, every request goes at once.

The clients are 20 concurrent aiohttp requests on 20 connections (no client-side pool limit), so any
cap the upstream observes is the relay's.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping

import aiohttp
import orjson

from relay.testing import Recorded, Responder, UpstreamThread
from tests.servers import MODEL, RelayServer

CLIENTS = 20
CAP = 3
TIMEOUT = 30.0
CHAT_REQUEST = {"messages": [{"role": "user", "content": "hi"}]}


async def _post_all(url: str, count: int, headers: Mapping[str, str]) -> list[tuple[int, dict[str, object]]]:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def one() -> tuple[int, dict[str, object]]:
            async with session.post(f"{url}/chat/completions", json=CHAT_REQUEST, headers=dict(headers)) as response:
                return response.status, await response.json(content_type=None)

        return await asyncio.gather(*(one() for _ in range(count)))


def post_concurrently(
    server: RelayServer, count: int, headers: Mapping[str, str] | None = None
) -> list[tuple[int, dict[str, object]]]:
    return asyncio.run(_post_all(server.api_url, count, headers or {}))


def settle(upstream: UpstreamThread) -> None:
    """Start from an idle upstream, so max_in_flight counts this test's requests only."""
    assert upstream.wait_for(lambda u: u.in_flight == 0, timeout=10)
    upstream.upstream.reset()


def assert_all_completions(results: list[tuple[int, dict[str, object]]]) -> None:
    assert len(results) == CLIENTS
    assert [status for status, _ in results] == [200] * CLIENTS
    assert all(payload["model"] == MODEL for _, payload in results)


def test_cap_bounds_requests_in_flight_and_all_complete(
    relay_factory: Callable[..., RelayServer], upstream: UpstreamThread
) -> None:
    server = relay_factory(max_concurrent_requests=CAP)
    settle(upstream)
    # Each upstream answer takes 200 ms, so 20 clients overlap and the waiting ones queue in the relay.
    results = post_concurrently(server, CLIENTS, {"x-fake-delay-ms": "200"})
    assert_all_completions(results)
    assert len(upstream.upstream.requests) == CLIENTS
    # Exactly the cap: never more, and the queue really filled it.
    assert upstream.upstream.max_in_flight == CAP


def _gated_handler(gate: threading.Event) -> Callable[[Recorded, Responder], object]:
    """Answers a chat completion only once the test opens the gate (after all requests have arrived)."""
    body = orjson.dumps({"object": "chat.completion", "model": MODEL, "choices": []})

    async def handler(request: Recorded, responder: Responder) -> None:
        await responder.wait(gate, timeout=TIMEOUT)
        headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
        await responder.start(200, headers)
        await responder.write(body)

    return handler


def test_without_cap_every_request_reaches_the_upstream_at_once(relay: RelayServer, upstream: UpstreamThread) -> None:
    settle(upstream)
    gate = threading.Event()
    # No timing involved: the upstream holds every answer until all 20 are in flight together.
    upstream.upstream.handler = _gated_handler(gate)
    results: list[tuple[int, dict[str, object]]] = []
    clients = threading.Thread(target=lambda: results.extend(post_concurrently(relay, CLIENTS)))
    clients.start()
    try:
        all_in = upstream.wait_for(lambda u: u.in_flight >= CLIENTS, timeout=15)
    finally:
        gate.set()
        clients.join(TIMEOUT)
    assert all_in, f"only {upstream.upstream.max_in_flight} of {CLIENTS} requests reached the upstream together"
    assert not clients.is_alive()
    assert_all_completions(results)
    assert upstream.upstream.max_in_flight == CLIENTS
