"""The pure arithmetic of the cluster's limits: the GCRA budget (the same formulas as the Lua scripts of
relay.cluster.store, which run them in Redis; this one runs them in the process while Redis is
unreachable), a request's token estimate, and the upstream's `x-ratelimit-reset-*` durations.

GCRA (the generic cell rate algorithm) keeps one number per budget: the theoretical arrival time `tat`,
when the budget would be back to full if nothing more came. A request of `cost` may start at
`max(now, tat - tolerance)`; starting moves `tat` to `max(tat, start) + cost * interval`. So a budget of
R per minute lets at most R * (W + burst_seconds) / 60 + 1 requests (or tokens, plus one request's
cost) start in any window of W seconds, whatever the number of processes, and costs one number in Redis.
A request learns when it may start in the same round trip that reserves it, so it waits for its turn
instead of being sent to be refused, and one that would wait too long is refused at once.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# Why a request was refused, as the Lua scripts of relay.cluster.store number it (0: it was not).
REQUESTS, TOKENS, PAUSED = 1, 2, 3
REFUSED_FOR = {REQUESTS: "requests", TOKENS: "tokens", PAUSED: "paused"}

# OpenAI's x-ratelimit-reset-* values: Go durations such as "1s", "6m0s", "20ms", "1h2m3.5s".
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs|ns)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
MAX_PAUSE_SECONDS = 600.0  # an upstream's longer reset is taken as this: a typo must not stop a job for a day
# The output-size fields of both APIs; the first one in the body is the estimate (an estimate: corrected
# from the answer's usage afterwards, so a nested key that happens to match costs nothing lasting).
_MAX_TOKENS = re.compile(rb'"(?:max_completion_tokens|max_tokens|max_output_tokens)"\s*:\s*(\d{1,9})\b')


class Admitted(NamedTuple):
    """One admission round's answer, from Redis or from the process's own fallback: the first `taken`
    waiters got a slot (if capped) and budget, each to wait its `waits` (ms) before it is sent; the next
    one is refused when `reason` is set, as it would have waited `refused_wait` ms."""

    taken: int
    reason: int
    refused_wait: int
    now: int  # the clock of the answer (Redis's, in ms)
    slots_in_use: int
    queued: bool  # the process keeps its place in the cluster's queue (it has more waiters)
    requests_left: int  # what each budget could admit at once; -1 where no budget is set
    tokens_left: int
    waits: list[int]


class Bucket:
    """One GCRA budget in milliseconds: `interval` per unit of cost, `tolerance` the burst."""

    __slots__ = ("interval", "tolerance", "tat")

    def __init__(self, per_minute: int, burst_seconds: float) -> None:
        self.interval = 60_000.0 / per_minute
        self.tolerance = burst_seconds * 1000.0
        self.tat = 0.0

    def start(self, now: float) -> float:
        """When a request could start, in the clock of `now` (ms)."""
        return max(now, self.tat - self.tolerance)

    def take(self, start: float, cost: float) -> None:
        self.tat = max(self.tat, start) + cost * self.interval

    def correct(self, now: float, delta: float) -> None:
        """Charge `delta` more units (fewer, if negative) than were reserved; a budget never goes above full."""
        self.tat = max(max(self.tat, now) + delta * self.interval, now)

    def remaining(self, now: float) -> int:
        """Units that could start now without waiting."""
        room = now + self.tolerance - max(self.tat, now)
        return int(room // self.interval) + 1 if room >= 0 else 0


def reserve(buckets: tuple[Bucket | None, Bucket | None], now: float, cost: int, allowance: float, pause_until: float) -> tuple[float, int]:
    """Reserve one request of `cost` tokens in the (requests, tokens) buckets -> (the milliseconds it
    waits before it is sent, 0); or, when that wait would be more than `allowance`, nothing is reserved
    and the reason is REQUESTS, TOKENS or PAUSED (whichever makes it wait longest)."""
    requests, tokens = buckets
    start, why = max(now, pause_until), PAUSED
    if requests is not None and requests.start(now) > start:
        start, why = requests.start(now), REQUESTS
    if tokens is not None and tokens.start(now) > start:
        start, why = tokens.start(now), TOKENS
    if start - now > allowance:
        return start - now, why
    if requests is not None:
        requests.take(start, 1)
    if tokens is not None:
        tokens.take(start, cost)
    return start - now, 0


def estimate(body: bytes, default: int) -> int:
    """The tokens charged before the answer: the body's max_completion_tokens, max_tokens or
    max_output_tokens, else `default`. The answer's usage replaces it afterwards."""
    found = _MAX_TOKENS.search(body)
    return int(found.group(1)) if found else default


def reset_seconds(value: str | None) -> float | None:
    """An `x-ratelimit-reset-*` value in seconds ("6m0s" -> 360.0; a bare number is seconds), or None."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION.findall(text)
        if not parts or "".join(number + unit for number, unit in parts) != text:
            return None
        seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    if not 0 <= seconds < float("inf"):
        return None
    return min(seconds, MAX_PAUSE_SECONDS)


def share(limit: int | None, processes: int) -> int | None:
    """One process's even share of a cluster-wide limit (at least 1), for while Redis is unreachable."""
    if limit is None:
        return None
    return max(1, limit // max(1, processes))
