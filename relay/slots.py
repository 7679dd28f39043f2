"""The per-process cap on upstream requests in flight (`max_concurrent_requests`)."""

from __future__ import annotations

import asyncio
import time


class Slots:
    """At most `cap` upstream requests in flight (None: no cap); waiters are admitted in FIFO order.

    `acquire_now()` takes a free slot without waiting, and says whether it could; otherwise
    `await acquire()` waits for one and returns the seconds spent waiting. Either way `release()` gives it
    back. Without a cap nothing is ever awaited. The counts are plain numbers, which the metrics sample.
    """

    def __init__(self, cap: int | None) -> None:
        self._semaphore = asyncio.Semaphore(cap) if cap else None
        self.in_flight = 0
        self.waiting = 0

    def acquire_now(self) -> bool:
        if self._semaphore is None:
            self.in_flight += 1
            return True
        return False  # Semaphore.acquire() is a coroutine even when a slot is free: acquire() takes it

    async def acquire(self) -> float:
        semaphore = self._semaphore
        assert semaphore is not None
        if not semaphore.locked():
            await semaphore.acquire()  # a free slot: acquire() returns without suspending
            self.in_flight += 1
            return 0.0
        started = time.perf_counter()
        self.waiting += 1
        try:
            await semaphore.acquire()
        finally:
            self.waiting -= 1
        self.in_flight += 1
        return time.perf_counter() - started

    def release(self) -> None:
        self.in_flight -= 1
        if self._semaphore is not None:
            self._semaphore.release()
