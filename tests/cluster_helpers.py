"""Shared by the cluster tests: concurrent clients spread over several relays, and a look at the cluster's
keys in Redis."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import redis

from tests.redis_server import RedisServer
from tests.servers import RelayServer

CLIENT_TIMEOUT = 30.0  # every request is bounded: one that hangs fails the test
CHAT_REQUEST = {"messages": [{"role": "user", "content": "hi"}]}
_names = itertools.count(1)


def cluster_of(server: RedisServer, **limits: Any) -> dict[str, Any]:
    """A `cluster:` block of a name no other test uses, so tests never share keys."""
    return {"redis_url": server.url, "name": f"test-{time.time_ns()}-{next(_names)}", **limits}


@dataclass
class Outcome:
    status: int
    headers: Mapping[str, str]
    body: dict[str, Any]
    relay: int  # index of the relay that answered
    seconds: float


async def _post_all(urls: Sequence[str], count: int, headers: Mapping[str, str], body: Mapping[str, Any]) -> list[Outcome]:
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def one(index: int) -> Outcome:
            started = time.monotonic()
            which = index % len(urls)
            async with session.post(f"{urls[which]}/chat/completions", json=dict(body), headers=dict(headers)) as response:
                payload = await response.json(content_type=None)
                received = {name.lower(): value for name, value in response.headers.items()}
                return Outcome(response.status, received, payload, which, time.monotonic() - started)

        return await asyncio.gather(*(one(i) for i in range(count)))


def post_spread(
    relays: Sequence[RelayServer], count: int, headers: Mapping[str, str] | None = None, body: Mapping[str, Any] = CHAT_REQUEST
) -> list[Outcome]:
    """`count` concurrent requests, each on its own connection, dealt round robin over `relays`."""
    return asyncio.run(_post_all([relay.api_url for relay in relays], count, headers or {}, body))


def redis_client(server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5, decode_responses=True)


def key(cluster: Mapping[str, Any], name: str) -> str:
    """One of the cluster's keys (relay.cluster.store names them)."""
    return f"relay:{{{cluster['name']}}}:{name}"


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)
