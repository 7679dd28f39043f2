"""Load, bounded: thousands of concurrent streams through one relay process arrive whole and identical, and
under a cap the upstream never sees more than the cap while the queue is served first come, first served.

Clients are aiohttp sessions without a connection limit, so every request has a connection of its own
and any limit the upstream observes is the relay's.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping

import aiohttp
import orjson
import pytest

from bench.procs import raise_fd_limit
from relay.testing import FakeUpstream, Recorded, Responder, UpstreamThread
from tests.servers import MODEL, RelayServer, metric_value, relay_metric

TIMEOUT = 60.0  # per request: a stuck one fails the test instead of hanging it
CHAT = "/chat/completions"


def client_session() -> aiohttp.ClientSession:
    # No pool limit (aiohttp's default is 100) and no decompression: raw bytes, one connection each.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=TIMEOUT),
    )


def quiet(upstream: UpstreamThread) -> None:
    """Start from an idle upstream, so its counters count this test's requests only."""
    assert upstream.wait_for(lambda u: u.in_flight == 0, timeout=10)
    upstream.upstream.reset()


# --- 2,000 concurrent streams --------------------------------------------------------------------------

STREAMS = 2000
STREAM_DIRECTIVES = {"x-fake-events": "20", "x-fake-event-delay-ms": "20"}  # ~0.4 s each, so they overlap


async def _fetch(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: Mapping[str, str]
) -> tuple[int, bytes]:
    async with session.post(url, data=body, headers=dict(headers)) as response:
        return response.status, await response.read()


async def _many_streams(relay_url: str, upstream_url: str) -> tuple[bytes, list[tuple[int, bytes]]]:
    request = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"Content-Type": "application/json", **STREAM_DIRECTIVES}
    async with client_session() as session:
        # Direct, with the configured model (which the fake upstream echoes): what every relayed body must be.
        status, direct = await _fetch(session, upstream_url + CHAT, orjson.dumps({**request, "model": MODEL}), headers)
        assert status == 200
        relayed = orjson.dumps({**request, "model": "client-model"})
        results = await asyncio.gather(*(_fetch(session, relay_url + CHAT, relayed, headers) for _ in range(STREAMS)))
    return direct, results


def test_2000_concurrent_streams_arrive_whole_and_identical(relay: RelayServer, upstream: UpstreamThread) -> None:
    # This process holds both ends of every stream (client and fake upstream): 2 sockets per stream.
    if raise_fd_limit(4 * STREAMS) < 3 * STREAMS:
        pytest.skip("the open-file limit is too low for this many streams")
    quiet(upstream)
    direct, results = asyncio.run(_many_streams(relay.api_url, upstream.base_url))
    assert direct.count(b"data: ") == 21  # 20 events and [DONE]: a real stream to compare with
    statuses = [status for status, _ in results]
    assert statuses == [200] * STREAMS, {status: statuses.count(status) for status in set(statuses)}
    different = sum(body != direct for _, body in results)
    assert different == 0, f"{different} of {STREAMS} streams differ from the upstream's own bytes"
    assert len(upstream.upstream.requests) == STREAMS + 1
    # They did run together (not one after the other), or this would not be a load test.
    assert upstream.upstream.max_in_flight > STREAMS // 10


# --- a cap under a queue: never more than the cap, nothing lost, first come first served -----------------

CAP = 8
QUEUED = 500
STEP_TIMEOUT = 10.0


class OneAtATime:
    """The upstream holds every request until the test opens `gate`, then answers one at a time, each only
    once the relay has sent the request that the previous answer let in. Slots therefore free up one by
    one, and the order in which requests reach the upstream is exactly the order the relay admits them."""

    def __init__(self, upstream: FakeUpstream, gate: threading.Event) -> None:
        self.upstream = upstream
        self.gate = gate
        self.answered = 0
        self.turn: asyncio.Lock | None = None  # made on the upstream's loop, on first use
        self.body = orjson.dumps({"object": "chat.completion", "model": MODEL, "choices": []})

    async def __call__(self, request: Recorded, responder: Responder) -> None:
        assert await responder.wait(self.gate, timeout=TIMEOUT), "the test never opened the gate"
        if self.turn is None:
            self.turn = asyncio.Lock()
        async with self.turn:
            admitted = min(QUEUED, CAP + self.answered)
            deadline = time.monotonic() + STEP_TIMEOUT
            while len(self.upstream.requests) < admitted:
                assert time.monotonic() < deadline, f"the relay sent {len(self.upstream.requests)} of {admitted}"
                await asyncio.sleep(0.0005)
            await responder.start(200, [("content-type", "application/json"), ("content-length", str(len(self.body)))])
            await responder.write(self.body)
            self.answered += 1


async def _queue_in_order(server: RelayServer, upstream: FakeUpstream, gate: threading.Event) -> list[int]:
    """Send request k only once the relay has k-1 in place (in flight, or queued behind the others), so the
    order in which the relay received them is known exactly, without timing; then open the gate."""
    async with client_session() as session:

        async def one(index: int) -> int:
            body = orjson.dumps({"messages": [{"role": "user", "content": "hi"}], "metadata": {"i": index}})
            headers = {"Content-Type": "application/json"}
            async with session.post(server.api_url + CHAT, data=body, headers=headers) as response:
                await response.read()
                return response.status

        async def in_place(index: int) -> bool:
            if index < CAP:  # a free slot: it goes straight to the upstream
                return len(upstream.requests) > index
            async with session.get(f"{server.url}/metrics") as response:
                return metric_value(await response.text(), "relay_slot_waiting") >= index - CAP + 1

        tasks = []
        for index in range(QUEUED):
            tasks.append(asyncio.create_task(one(index)))
            deadline = time.monotonic() + STEP_TIMEOUT
            while not await in_place(index):
                assert time.monotonic() < deadline, f"request {index} never reached the upstream or the queue"
                await asyncio.sleep(0.001)
        gate.set()
        return list(await asyncio.gather(*tasks))


def test_cap_holds_under_a_queue_and_admits_in_arrival_order(
    relay_factory: Callable[..., RelayServer], upstream: UpstreamThread
) -> None:
    server = relay_factory(max_concurrent_requests=CAP)
    quiet(upstream)
    # The order of arrival is read off these gauges, so they must start from an idle relay.
    assert relay_metric(server, "relay_upstream_in_flight") == relay_metric(server, "relay_slot_waiting") == 0
    gate = threading.Event()
    upstream.upstream.handler = OneAtATime(upstream.upstream, gate)
    try:
        statuses = asyncio.run(_queue_in_order(server, upstream.upstream, gate))
    finally:
        gate.set()  # never leave upstream handlers waiting for a test that failed
    assert statuses == [200] * QUEUED  # none lost
    assert upstream.upstream.max_in_flight == CAP  # never more than the cap, and the queue did fill it
    order = [request.json()["metadata"]["i"] for request in upstream.upstream.requests]
    assert sorted(order[:CAP]) == list(range(CAP))  # the first CAP went straight through, together
    assert order[CAP:] == list(range(CAP, QUEUED)), "queued requests were not admitted first come, first served"
