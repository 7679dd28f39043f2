"""One process's side of the cluster's limits, as the request sees it: `admit` (a cluster slot and budget,
or a refusal), `release`, and `upstream_said` (the upstream's own rate-limit headers). The work behind
them is done by one task of each kind per process, never by the request: relay.cluster.pump admits,
relay.cluster.returns gives back, relay.cluster.keeper renews.

Fairness: each process queues its waiters here, in arrival order, and its pump asks Redis for the first
of them in one call: Redis holds one ticket per process, not one per request, ranked by the arrival of
that process's oldest waiter on Redis's clock. Slots go to the processes in that order, so the oldest
waiter of the whole cluster is served first (to within a round trip), whatever process it came to, and
no process starves another; a freed slot wakes the process next in line (Redis pub/sub).

Cancellation: `release` never awaits. It hands the slot to the process's one returning task, which the
Gate holds a strong reference to, so a client that leaves mid-request (which cancels the request's
task) can never lose a release.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from relay.cluster.budget import estimate, reset_seconds
from relay.cluster.link import Link
from relay.cluster.local import Fallback
from relay.cluster.pump import Pump, Waiter
from relay.cluster.refusals import refusal
from relay.cluster.returns import Returns
from relay.failures import Failure
from relay.settings import Cluster
from relay.usage import COMPLETION, PROMPT

POLL = 1.0  # seconds: the longest a waiter goes without looking again (lost wakes, slots of dead processes)
_RATE_HEADERS = (
    ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
    ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
)


@dataclass(slots=True)
class Admission:
    """What an admitted request holds until it is released."""

    slot: str | None  # None: no cluster cap
    cost: int
    attempts: int  # the request's attempts when admitted: more at release means it was sent


class Gate:
    def __init__(self, settings: Cluster, store: Any) -> None:
        """`store`: a relay.cluster.store.Store (typed loosely: this module never imports redis)."""
        self.settings = settings
        self.store = store
        self.errors: tuple[type[BaseException], ...] = store.errors
        self.link = Link(settings.name, settings.on_redis_error)
        self.fallback = Fallback(settings)
        self.pid = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.capped = settings.max_concurrent_requests is not None
        self.counting_tokens = settings.tokens_per_minute is not None
        self.refuse_when_down = settings.on_redis_error == "fail"
        self.renew_every = settings.lease_seconds / 3  # a slot outlives two missed renewals
        self.poll = min(POLL, self.renew_every)
        self.held: set[str] = set()  # slot ids in use by this process's requests
        self.orphans: set[str] = set()  # slots whose release failed: dropped at the next renewal
        self.wake = asyncio.Event()  # a slot may be free: the pump looks again
        self.offset_ms: float | None = None  # Redis's clock minus time.monotonic(), in ms
        self.paused_until = 0.0  # the upstream said its budget is spent until then (monotonic)
        # What the metrics sample (relay.cluster.metrics): as of the last answer, and counts since the last flush.
        self.slots_in_use = 0
        self.budget_left = (-1, -1)
        self.sleeping = 0  # admitted, waiting for their budget's turn
        self.refused: dict[str, int] = {}
        self.pauses = 0
        self.tokens_charged = 0
        self.waits: list[float] | None = None  # a list while metrics are on (they empty it)
        self.pump = Pump(self)
        self.returns = Returns(self)

    @property
    def waiting(self) -> int:
        return len(self.pump.waiters) + self.sleeping

    async def admit(self, record: Any, body: bytes) -> Failure | None:
        """Wait for a cluster slot and budget (the record then holds them), or the refusal to answer."""
        if self.refuse_when_down and not self.link.ok:
            return self._refuse(record, refusal("unavailable", 1.0, self.settings))
        cost = estimate(body, self.settings.default_max_tokens) if self.counting_tokens else 0
        arrived = time.monotonic()
        waiter = Waiter(asyncio.get_running_loop().create_future(), cost, arrived, arrived + self.settings.max_wait_seconds)
        self.pump.enqueue(waiter)
        try:
            granted = await waiter.future
        except asyncio.CancelledError:
            self._cancelled(waiter)
            raise
        if isinstance(granted, Failure):
            return self._refuse(record, granted)
        slot, wait = granted
        record.admission = Admission(slot, cost, record.attempts)
        if wait > 0:
            self.sleeping += 1
            try:
                await asyncio.sleep(wait)  # cancelled: the caller's release gives everything back
            finally:
                self.sleeping -= 1
        waited = time.monotonic() - arrived
        record.slot_wait += waited
        if self.waits is not None:
            self.waits.append(waited)
        return None

    def release(self, record: Any, answered: bool) -> None:
        """The request's slot goes back, and its token charge becomes what it used: the answer's usage;
        the estimate if a successful answer had none (a stream without its usage chunk); nothing if
        there was no successful answer. A request that was never sent gets its request back too."""
        admission = record.admission
        if admission is None:
            return
        record.admission = None
        used = 0
        if self.counting_tokens and answered and 200 <= record.status < 300:
            tokens = record.tokens()
            used = admission.cost if tokens is None else tokens[PROMPT] + tokens[COMPLETION]
        self.tokens_charged += used
        self.returns.give_back(admission.slot, 0 if record.attempts > admission.attempts else 1, used - admission.cost)

    def upstream_said(self, headers: Mapping[str, str]) -> None:
        """The upstream's own budget (OpenAI's x-ratelimit-* headers): when it says one is spent, every
        relay of the cluster pauses until its reset, instead of each learning it from its own 429."""
        for remaining, reset in _RATE_HEADERS:
            left = headers.get(remaining)
            if left is not None and left.strip() == "0":
                seconds = reset_seconds(headers.get(reset))
                if seconds:
                    self.returns.pause(seconds)

    def _cancelled(self, waiter: Waiter) -> None:
        """The request's task was cancelled while it waited (its client left): a slot granted in that
        instant goes back unused."""
        future = waiter.future
        if not future.done() or future.cancelled():
            self.pump.forget(waiter)
        elif isinstance(future.result(), tuple):
            self.returns.give_back(future.result()[0], 1, -waiter.cost)

    def _refuse(self, record: Any, failure: Failure) -> Failure:
        reason = failure.kind.removeprefix("cluster_")
        self.refused[reason] = self.refused.get(reason, 0) + 1
        record.error = failure.kind
        return failure
