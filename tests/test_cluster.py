"""Cluster-wide limits (`cluster:`): several real relay processes (one with --workers 2) share one real
redis-server, in front of one fake upstream that records what reached it. The cap holds across all of
them, a killed relay's slots come back within the lease, the request budget bounds every window, tokens
are charged from each answer's usage, the upstream's own "budget spent" pauses every relay, and clients
that leave (waiting or holding a slot) lose no slot."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import orjson
import pytest

from relay.testing import Recorded, Responder, UpstreamThread
from tests.clients import CHAT, RESPONSES, assert_openai_error, connect, post, post_bytes, scrape_until, scrape_when_idle
from tests.cluster_helpers import CLIENT_TIMEOUT, Outcome, cluster_of, key, post_spread, redis_client, wait_until
from tests.redis_server import RedisServer
from tests.servers import MODEL, RelayServer

Spawn = Callable[..., RelayServer]


def settle(upstream: UpstreamThread) -> None:
    """Start from an idle upstream, so max_in_flight counts this test's requests only."""
    assert upstream.wait_for(lambda u: u.in_flight == 0, timeout=10)
    upstream.upstream.reset()


def statuses(outcomes: list[Outcome]) -> list[int]:
    return sorted({o.status for o in outcomes})


def test_the_cap_holds_across_processes_and_every_request_completes(
    spawn_relay: Spawn, upstream: UpstreamThread, redis_server: RedisServer
) -> None:
    cluster = cluster_of(redis_server, max_concurrent_requests=8, max_wait_seconds=60)
    relays = [spawn_relay(cluster=cluster), spawn_relay(cluster=cluster), spawn_relay(cluster=cluster, args=("--workers", "2"))]
    settle(upstream)
    outcomes = post_spread(relays, 200, {"x-fake-delay-ms": "100"})
    assert [o.status for o in outcomes] == [200] * 200
    assert all(o.body["model"] == MODEL for o in outcomes)
    assert len(upstream.upstream.requests) == 200
    # Never more than the cluster's cap at once, and the queue really filled it.
    assert upstream.upstream.max_in_flight == 8
    # Every process was served: none starved while another took the slots.
    assert {o.relay for o in outcomes} == {0, 1, 2}


def test_a_killed_relays_slots_come_back_within_the_lease(
    spawn_relay: Spawn, upstream: UpstreamThread, redis_server: RedisServer
) -> None:
    lease = 2.0
    cluster = cluster_of(redis_server, max_concurrent_requests=4, lease_seconds=lease, max_wait_seconds=30)
    victim, survivor = spawn_relay(cluster=cluster), spawn_relay(cluster=cluster)
    settle(upstream)
    # The victim takes every slot with answers that would take a minute.
    held = threading.Thread(target=lambda: _ignore_errors(lambda: post_spread([victim], 4, {"x-fake-delay-ms": "60000"})), daemon=True)
    held.start()
    assert upstream.wait_for(lambda u: u.in_flight == 4, timeout=10)
    results: list[Outcome] = []
    waiting = threading.Thread(target=lambda: results.extend(post_spread([survivor], 6, {"x-fake-delay-ms": "20"})))
    waiting.start()
    wait_until(lambda: redis_client(redis_server).zcard(key(cluster, "queue")) == 1, 10, "the survivor queues for a slot")
    assert len(upstream.upstream.requests) == 4  # nothing of the survivor's went yet
    killed = time.monotonic()
    os.kill(victim.process.pid, signal.SIGKILL)
    victim.process.wait(timeout=10)
    waiting.join(CLIENT_TIMEOUT)
    assert not waiting.is_alive()
    # No request of the other relay failed, and the dead process's slots came back within the lease.
    assert [o.status for o in results] == [200] * 6
    assert time.monotonic() - killed < lease + 3.0


def _ignore_errors(action: Callable[[], object]) -> None:
    try:
        action()
    except Exception:
        pass  # the relay these requests went to was killed under them


def _arrivals(upstream: UpstreamThread) -> list[float]:
    """Install a handler that answers a chat completion and notes when each request arrived."""
    seen: list[float] = []
    body = orjson.dumps({"object": "chat.completion", "model": MODEL, "choices": []})

    async def handler(request: Recorded, responder: Responder) -> None:
        seen.append(time.monotonic())
        await responder.start(200, [("content-type", "application/json"), ("content-length", str(len(body)))])
        await responder.write(body)

    upstream.upstream.handler = handler
    return seen


def test_the_request_budget_bounds_every_window_and_refuses_past_the_wait(
    spawn_relay: Spawn, upstream: UpstreamThread, redis_server: RedisServer
) -> None:
    budget, burst, max_wait = 120, 1.0, 3.0
    cluster = cluster_of(redis_server, requests_per_minute=budget, burst_seconds=burst, max_wait_seconds=max_wait)
    relays = [spawn_relay(cluster=cluster), spawn_relay(cluster=cluster)]
    settle(upstream)
    arrivals = _arrivals(upstream)
    outcomes = post_spread(relays, 300)
    assert statuses(outcomes) == [200, 429]
    passed = [o for o in outcomes if o.status == 200]
    assert len(arrivals) == len(passed) >= 2
    # GCRA's bound (README): at most budget * (W + burst_seconds) / 60 + 1 in any window of W seconds;
    # one more for the trip from the relay to the upstream, which may bring two sends closer.
    arrivals.sort()
    for first, start in enumerate(arrivals):
        for last in range(first, len(arrivals)):
            window = arrivals[last] - start
            assert last - first + 1 <= budget * (window + burst) / 60 + 2, (first, last, window)
    # Those that would have waited past max_wait_seconds were refused at once, with when to come back.
    for refused in (o for o in outcomes if o.status == 429):
        error = refused.body["error"]
        assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests")
        assert int(refused.headers["retry-after"]) >= max_wait  # it would have waited longer than allowed
        assert refused.seconds < max_wait  # refused without waiting for nothing


@pytest.fixture
def token_relay(spawn_relay: Spawn, redis_server: RedisServer) -> tuple[RelayServer, dict]:
    # 6,000 tokens a minute: 10 ms of the budget per token, so the charge shows in the bucket to the token.
    cluster = cluster_of(redis_server, tokens_per_minute=6000, burst_seconds=10, default_max_tokens=50, max_wait_seconds=20)
    return spawn_relay(cluster=cluster, include_stream_usage=False), cluster


def _usage_total(reply_body: bytes, stream: bool) -> int:
    if not stream:
        usage = orjson.loads(reply_body)["usage"]
    else:
        events = [orjson.loads(line[6:]) for line in reply_body.split(b"\n") if line.startswith(b"data: {")]
        usage = [u for u in (e.get("usage") or e.get("response", {}).get("usage") for e in events) if u][-1]
    return usage.get("prompt_tokens", usage.get("input_tokens")) + usage.get("completion_tokens", usage.get("output_tokens"))


@pytest.mark.parametrize(
    ("target", "body"),
    [
        (CHAT, {"messages": [], "max_tokens": 7}),
        (CHAT, {"messages": [], "stream": True, "stream_options": {"include_usage": True}}),
        (RESPONSES, {"input": "hi"}),
        (RESPONSES, {"input": "hi", "stream": True, "max_output_tokens": 5}),
    ],
    ids=["chat", "chat-stream", "responses", "responses-stream"],
)
def test_tokens_are_charged_from_the_answers_usage(
    token_relay: tuple[RelayServer, dict], redis_server: RedisServer, target: str, body: dict
) -> None:
    relay, cluster = token_relay
    bucket = key(cluster, "tokens")
    client = redis_client(redis_server)
    # A first request puts the bucket ahead of the clock: each charge then adds exactly its tokens to it.
    assert post(relay, b'{"messages":[]}', CHAT).status == 200
    wait_until(lambda: client.get(bucket) is not None, 5, "the token bucket exists")
    before_metric = scrape_when_idle(relay).value("relay_cluster_tokens_charged_total")
    before = float(client.get(bucket))
    reply = post(relay, orjson.dumps(body), target, {"x-fake-size": "40"})
    assert reply.status == 200
    used = _usage_total(reply.body, body.get("stream", False))
    assert used > 0
    interval = 60_000 / 6000
    # The estimate (max_*tokens, or default_max_tokens) was charged first, then corrected to the usage.
    wait_until(lambda: round((float(client.get(bucket)) - before) / interval) == used, 5, f"{used} tokens charged")
    after_metric = scrape_when_idle(relay).value("relay_cluster_tokens_charged_total")
    assert after_metric - before_metric == used


def test_the_upstreams_spent_budget_pauses_the_other_relays_too(
    spawn_relay: Spawn, upstream: UpstreamThread, redis_server: RedisServer
) -> None:
    cluster = cluster_of(redis_server, max_concurrent_requests=64, max_wait_seconds=0.5)
    first, other = spawn_relay(cluster=cluster), spawn_relay(cluster=cluster)
    settle(upstream)
    spent = orjson.dumps({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}).decode()
    limited = post(first, headers={"x-fake-status": "429", "x-fake-headers": spent})
    assert limited.status == 429  # the upstream's own answer, passed through
    client = redis_client(redis_server)
    wait_until(lambda: client.pttl(key(cluster, "pause")) > 0, 5, "the pause is shared in Redis")
    # The other relay, which never saw the 429, holds its requests back too: this one would have to wait
    # longer than its max_wait_seconds, so it is refused without reaching the upstream.
    paused = post(other)
    error = assert_openai_error(paused, 429, "rate_limit_exceeded")
    assert error["type"] == "requests" and int(paused.header("retry-after")) >= 1
    assert len(upstream.upstream.requests) == 1
    # After the reset, it relays again.
    wait_until(lambda: client.pttl(key(cluster, "pause")) < 0, 5, "the pause ends")
    assert post(other).status == 200
    assert len(upstream.upstream.requests) == 2


def test_clients_that_leave_lose_no_slot(spawn_relay: Spawn, upstream: UpstreamThread, redis_server: RedisServer) -> None:
    cluster = cluster_of(redis_server, max_concurrent_requests=2, max_wait_seconds=30)
    relay = spawn_relay(cluster=cluster)
    settle(upstream)
    client = redis_client(redis_server)
    leases, queue = key(cluster, "leases"), key(cluster, "queue")
    slow = post_bytes(b'{"messages":[]}', CHAT, {"x-fake-delay-ms": "3000"})
    holders = [connect(relay.port) for _ in range(2)]
    for sock in holders:
        sock.sendall(slow)
    assert upstream.wait_for(lambda u: u.in_flight == 2, timeout=10)
    waiters = [connect(relay.port) for _ in range(3)]
    for sock in waiters:
        sock.sendall(slow)
    scrape_until(relay, lambda s: s.value("relay_cluster_waiting") == 3)
    for sock in waiters:  # they leave while they wait for a slot...
        sock.close()
    holders[0].close()  # ...and one leaves while it holds one
    wait_until(lambda: client.zcard(leases) == 1 and client.zcard(queue) == 0, 5, "only the remaining holder's slot is held")
    assert scrape_until(relay, lambda s: s.value("relay_cluster_waiting") == 0).value("relay_cluster_slots_held") == 1
    assert post(relay).status == 200  # the free slot is usable at once
    holders[1].close()
    wait_until(lambda: client.zcard(leases) == 0, 5, "every slot is back")
    assert len(upstream.upstream.requests) == 3  # the ones that left while waiting never reached it
