"""The pure parts of the cluster's limits (relay.cluster.budget, .local, .refusals): the GCRA budget and
its window bound, the token estimate from a body, the upstream's reset durations, a process's share."""

from __future__ import annotations

import random

import pytest

from relay.cluster.budget import MAX_PAUSE_SECONDS, PAUSED, REQUESTS, TOKENS, Bucket, estimate, reserve, reset_seconds, share
from relay.cluster.local import Fallback
from relay.cluster.refusals import refusal
from relay.settings import Cluster


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1m2.5s", 62.5), ("1.5ms", 0.0015), ("0.5", 0.5), ("2", 2.0), ("0s", 0.0), (" 7s ", 7.0)],
)
def test_reset_durations_as_openai_sends_them(value: str, seconds: float) -> None:
    assert reset_seconds(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [None, "", "soon", "1x", "-1s", "1s2", "s", "nan", "inf"])
def test_a_reset_that_does_not_parse_is_ignored(value: str | None) -> None:
    assert reset_seconds(value) is None


def test_a_reset_too_long_is_capped() -> None:
    assert reset_seconds("48h") == MAX_PAUSE_SECONDS


@pytest.mark.parametrize(
    ("body", "tokens"),
    [
        (b'{"messages":[],"max_tokens":300}', 300),
        (b'{"messages":[],"max_completion_tokens" : 42}', 42),
        (b'{"input":"hi","max_output_tokens":\n 9000}', 9000),
        (b'{"messages":[]}', 64),
        # Inside a string the quotes are escaped, so a prompt that mentions the field does not count.
        (b'{"messages":[{"role":"user","content":"set \\"max_tokens\\": 5"}]}', 64),
        (b'{"max_tokens":null}', 64),
    ],
)
def test_the_estimate_is_the_bodys_output_limit_else_the_default(body: bytes, tokens: int) -> None:
    assert estimate(body, 64) == tokens


def test_a_burst_then_one_interval_apart() -> None:
    bucket = Bucket(per_minute=60, burst_seconds=2)  # 1 s per request, 2 s of tolerance: 3 at once
    waits = [reserve((bucket, None), 0.0, 0, 10_000, 0)[0] for _ in range(5)]
    assert waits == [0, 0, 0, 1000, 2000]


def test_a_wait_past_the_allowance_reserves_nothing_and_says_why() -> None:
    requests, tokens = Bucket(60, 0), Bucket(600, 0)  # 1 s per request; 100 ms per token
    assert reserve((requests, tokens), 0.0, 5, 0, 0) == (0, 0)
    before = (requests.tat, tokens.tat)
    assert reserve((requests, tokens), 0.0, 5, 500, 0) == (1000, REQUESTS)
    assert (requests.tat, tokens.tat) == before
    assert reserve((None, tokens), 0.0, 5, 100, 0) == (500, TOKENS)
    assert reserve((None, None), 0.0, 5, 100, 3000) == (3000, PAUSED)


def test_corrections_charge_and_refund_but_never_past_full() -> None:
    bucket = Bucket(600, 0)  # 100 ms per token
    reserve((None, bucket), 0.0, 10, 0, 0)  # 10 tokens reserved
    bucket.correct(0.0, 30)  # the answer used 40
    assert bucket.tat == 4000
    bucket.correct(0.0, -40)  # the answer never came: all of it back
    assert bucket.tat == 0
    bucket.correct(0.0, -100)
    assert bucket.remaining(0.0) == 1  # full, not more than full


def test_every_window_holds_the_stated_bound() -> None:
    """README: at most rate * (W + burst_seconds) / 60 + 1 requests start in any window of W seconds."""
    rng = random.Random(7)
    per_minute, burst = 120, 1.5
    bucket = Bucket(per_minute, burst)
    starts, now = [], 0.0
    for _ in range(2000):
        now += rng.expovariate(1 / 300)  # arrivals faster than the budget, in bursts and lulls
        wait, refused = reserve((bucket, None), now, 0, 2000, 0)
        if not refused:
            starts.append(now + wait)
    starts.sort()
    assert len(starts) > 100
    for first in range(len(starts)):
        for last in range(first, min(len(starts), first + 200)):
            window = (starts[last] - starts[first]) / 1000
            assert last - first + 1 <= per_minute * (window + burst) / 60 + 1


def test_a_process_shares_the_cluster_limits_evenly() -> None:
    assert share(512, 4) == 128
    assert share(3, 4) == 1  # never nothing
    assert share(None, 4) is None
    settings = Cluster(redis_url="redis://x", name="job", max_concurrent_requests=8, requests_per_minute=600)
    fallback = Fallback(settings)
    assert fallback.cap == 8  # before Redis ever counted the processes
    fallback.seen(4)
    assert fallback.cap == 2
    admitted = fallback.admit([(0, 10_000)] * 5, held=1, now=0.0, pause_until=0.0)
    assert admitted.taken == 1 and admitted.reason == 0  # 2 for this process, 1 already held
    fixed = Fallback(Cluster(redis_url="redis://x", name="job", max_concurrent_requests=8, fallback_processes=2))
    fixed.seen(4)
    assert fixed.cap == 4  # fallback_processes wins over what Redis counted


@pytest.mark.parametrize(
    ("reason", "status", "code", "kind"),
    [
        ("busy", 503, "cluster_busy", "server_error"),
        ("unavailable", 503, "cluster_unavailable", "server_error"),
        ("requests", 429, "rate_limit_exceeded", "requests"),
        ("tokens", 429, "rate_limit_exceeded", "tokens"),
        ("paused", 429, "rate_limit_exceeded", "requests"),
    ],
)
def test_refusals_are_openai_shaped_with_retry_after(reason: str, status: int, code: str, kind: str) -> None:
    failure = refusal(reason, 2.2, Cluster(redis_url="redis://x", name="job", max_concurrent_requests=1))
    assert (failure.status, failure.code, failure.type) == (status, code, kind)
    assert dict(failure.headers) == {b"retry-after": b"3", b"retry-after-ms": b"2200"}
