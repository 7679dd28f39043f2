"""The cluster's Redis stops in the middle of a run (or freezes, which is a Redis that is slow) and comes
back on the same port: each relay does what `on_redis_error` says (local: every request is still served,
within the process's share of the limits; fail: 503 `cluster_unavailable`), no request hangs, each change
of state is logged once per process and shows in the metrics, and the limits come back by themselves."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from relay.testing import UpstreamThread
from tests.clients import scrape_until
from tests.cluster_helpers import cluster_of
from tests.redis_server import RedisServer
from tests.servers import RelayServer

Spawn = Callable[..., RelayServer]
ANSWER_WITHIN = 10.0  # a request that takes longer has hung on Redis
UNREACHABLE = "Redis unreachable"
RESTORED = "Redis answers again"


class Load:
    """Clients that keep posting to the relays from a thread until stopped; each answer is kept with the
    phase of the run it was sent in."""

    def __init__(self, relays: list[RelayServer], clients_per_relay: int = 4) -> None:
        self.relays = relays
        self.clients = clients_per_relay
        self.phase = "before"
        self.answers: list[tuple[str, int, str | None]] = []  # (phase, status, error code)
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(ANSWER_WITHIN + 5)
        assert not self._thread.is_alive(), "a client never got its answer"

    def until(self, count: int, timeout: float = 20.0) -> None:
        """Wait until `count` answers of the current phase are in."""
        deadline = time.monotonic() + timeout
        while sum(1 for phase, *_ in self.answers if phase == self.phase) < count:
            assert time.monotonic() < deadline, f"the load stalled in phase {self.phase}: {self.problems[:5]}"
            time.sleep(0.02)

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=ANSWER_WITHIN)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            await asyncio.gather(*(self._client(session, relay) for relay in self.relays for _ in range(self.clients)))

    async def _client(self, session: aiohttp.ClientSession, relay: RelayServer) -> None:
        while not self._stop.is_set():
            phase = self.phase
            try:
                async with session.post(f"{relay.api_url}/chat/completions", json={"messages": []}, headers={"x-fake-delay-ms": "20"}) as response:
                    payload = await response.json(content_type=None)
            except Exception as exc:  # a timeout is a hung request: the test fails on it
                self.problems.append(f"{type(exc).__name__}: {exc}")
                continue
            code = payload.get("error", {}).get("code") if response.status != 200 else None
            self.answers.append((phase, response.status, code))


def outage(redis: RedisServer, how: str) -> Callable[[], None]:
    """Take Redis away; returns what brings it back on the same port."""
    if how == "restart":
        redis.stop()
        return redis.start
    assert redis.process is not None
    os.kill(redis.process.pid, signal.SIGSTOP)  # frozen: every call to it times out
    pid = redis.process.pid
    return lambda: os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize(("mode", "how"), [("local", "restart"), ("fail", "restart"), ("local", "freeze")])
def test_a_redis_outage_follows_on_redis_error_and_recovers(
    spawn_relay: Spawn, upstream: UpstreamThread, tmp_path: Path, mode: str, how: str
) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    try:
        cluster = cluster_of(redis, max_concurrent_requests=4, on_redis_error=mode, lease_seconds=3, max_wait_seconds=5, redis_timeout=1.0)
        relays = [spawn_relay(cluster=cluster), spawn_relay(cluster=cluster)]
        with Load(relays) as load:
            load.until(20)
            load.phase = "outage"
            back = outage(redis, how)
            for relay in relays:
                relay.wait_for_log(UNREACHABLE, timeout=10)
            load.until(20)
            load.phase = "recovering"
            back()
            for relay in relays:
                relay.wait_for_log(RESTORED, timeout=10)
            load.phase = "after"
            load.until(20)
        assert load.problems == []
        by_phase = {phase: [(status, code) for p, status, code in load.answers if p == phase] for phase in ("before", "outage", "after")}
        assert set(by_phase["before"]) == {(200, None)}
        assert set(by_phase["after"]) == {(200, None)}  # the cluster-wide limits are back by themselves
        if mode == "local":
            assert set(by_phase["outage"]) == {(200, None)}  # each process kept its share of the cap
        else:
            assert set(by_phase["outage"]) <= {(200, None), (503, "cluster_unavailable")}
            assert (503, "cluster_unavailable") in by_phase["outage"]
        refused = 0.0
        for relay in relays:
            # Once per change of state, not once per request.
            assert relay.log().count(UNREACHABLE) == 1 and relay.log().count(RESTORED) == 1, relay.log()[-3000:]
            samples = scrape_until(relay, lambda s: s.value("relay_cluster_redis_ok") == 1)
            assert samples.value("relay_cluster_redis_errors_total") >= 1
            refused += samples.value("relay_cluster_refused_total", reason="unavailable")
        assert (refused > 0) == (mode == "fail")
    finally:
        if redis.process is not None and how == "freeze":
            os.kill(redis.process.pid, signal.SIGCONT)  # a failed test must not leave it frozen
        redis.stop()
