"""The deadlines of one relayed request, and who watches them.

Every deadline in the relay, and where it lives:
  request_head_timeout   relay.protocol        request line and headers (slowloris); 408
  request_body_timeout   relay.intake          the whole request body; 408
  slot wait              relay.slots           none of its own: total_timeout or the client leaving ends it
  cluster.max_wait_seconds  relay.cluster.pump  a cluster slot (then 503), a budget's turn (then 429 at once)
  cluster.redis_timeout  relay.cluster.store   every Redis call; past it Redis counts as unreachable
  cluster.lease_seconds  relay.cluster.keeper  a dead process's cluster slots expire after this
  connect_timeout        relay.upstream        aiohttp's connector, per connection attempt; 504
  read_timeout           Watchdog (here)       upstream silent: before its answer's head, or between chunks
  client_write_timeout   Watchdog (here)       a client that takes no byte of its response
  total_timeout          Watchdog (here)       the whole exchange, retries included
  retry.deadline         relay.retry           no retry starts later than this after arrival
  upstream_keepalive_seconds  relay.upstream   idle pooled connections are dropped after this
  shutdown_grace_seconds relay.cli (uvicorn)   in-flight requests after SIGTERM
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.types import Receive

from relay.client_connection import ClientConnection

# What an exchange is waiting for, and so which of its deadlines runs.
IDLE, UPSTREAM, CLIENT = 0, 1, 2
# Why the watchdog gave up.
CLIENT_LEFT = "client disconnected"
STOPPED_READING = "client stopped reading"
UPSTREAM_SILENT = "upstream silent"
TOO_LONG = "total_timeout passed"


class Watchdog:
    """Gives up on an exchange, once, by cancelling its task: when its client leaves, when the whole
    exchange outlasts total_timeout, or when what it waits for stalls: an upstream silent for read_timeout
    (its answer, or the next chunk), or a client that takes no byte for client_write_timeout (uvicorn's
    send waits for a full socket without limit).

    The proxy only notes what it waits for and since when (`waiting(phase)`); one timer per request
    compares that with the deadlines and re-arms itself. A timer rescheduled on every chunk, as aiohttp's
    sock_read does, costs more than relaying a small SSE event.
    """

    __slots__ = ("task", "reason", "phase", "since", "_deadlines", "_end", "_check_every", "_loop", "_now", "_timer")

    def __init__(
        self, task: asyncio.Task[object], deadlines: tuple[float | None, ...], total: float | None, check_every: float | None
    ) -> None:
        """`deadlines` by phase (IDLE, UPSTREAM, CLIENT); `check_every`: the shortest of all, None if none."""
        self.task = task
        self.reason: str | None = None
        self.phase = IDLE
        self._deadlines = deadlines
        self._check_every = check_every
        self._loop = task.get_loop()
        self._now = self._loop.time
        self.since = self._now()
        self._end = self.since + total if total is not None else None
        self._timer = self._loop.call_at(self.since + check_every, self._check) if check_every else None

    def waiting(self, phase: int) -> None:
        self.phase = phase
        self.since = self._now()

    def waiting_upstream(self) -> None:
        """A connection is there: what follows waits for the upstream (read_timeout)."""
        self.phase = UPSTREAM
        self.since = self._now()

    def client_left(self) -> None:
        self._give_up(CLIENT_LEFT)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _give_up(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.task.cancel()

    def _check(self) -> None:
        self._timer = None
        now = self._now()
        if self._end is not None and now >= self._end:
            self._give_up(TOO_LONG)
            return
        deadline = self._deadlines[self.phase]
        if deadline is not None and now - self.since >= deadline:
            self._give_up(STOPPED_READING if self.phase == CLIENT else UPSTREAM_SILENT)
            return
        # Not due yet. The wait may change to one with a shorter deadline before then, so look again
        # within the shortest one.
        wake = now + self._check_every
        if deadline is not None:
            wake = min(wake, self.since + deadline)
        if self._end is not None:
            wake = min(wake, self._end)
        self._timer = self._loop.call_at(wake, self._check)


def shortest(*deadlines: float | None) -> float | None:
    return min((d for d in deadlines if d is not None), default=None)


def watch_disconnect(client: ClientConnection | None, receive: Receive, watchdog: Watchdog) -> Callable[[], None]:
    """Give up on the request when its client disconnects; returns what stops the watch."""
    if client is not None:
        client.watch(watchdog.client_left)  # relay.protocol calls it from connection_lost
        return client.unwatch
    # Under plain uvicorn only a pending receive() hears of the disconnect, so a task waits in one.
    watcher = asyncio.get_running_loop().create_task(_abandon_on_disconnect(receive, watchdog))
    return watcher.cancel


async def _abandon_on_disconnect(receive: Receive, watchdog: Watchdog) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    watchdog.client_left()
