"""Giving back: the slots that requests released, the requests they never sent and their token
corrections go to Redis through one task per process, which takes everything released since its last
call in one call; and the upstream's pause, shared the same way. While Redis is unreachable, the
process's fallback takes them instead (and Redis drops the slots at the next renewal that reaches it)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING

from relay.cluster.pump import MAX_BATCH

if TYPE_CHECKING:
    from relay.cluster.gate import Gate

log = logging.getLogger("relay")


class Returns:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self._slots: list[str] = []
        self._unsent = 0
        self._token_delta = 0
        # Held here: the loop keeps only weak references to tasks.
        self._flushing: asyncio.Task[None] | None = None
        self._pausing: asyncio.Task[None] | None = None

    def give_back(self, slot: str | None, unsent: int, token_delta: int) -> None:
        """Never awaits: the caller may be a request whose task is being cancelled."""
        gate = self.gate
        if slot is not None:
            gate.held.discard(slot)
        if not gate.link.ok:
            if slot is not None:
                gate.orphans.add(slot)  # Redis may still count it from before the outage
            gate.fallback.correct(time.monotonic() * 1000, unsent, token_delta)
            gate.wake.set()
            return
        if slot is not None:
            self._slots.append(slot)
        self._unsent += unsent
        self._token_delta += token_delta
        if self._flushing is None and (self._slots or self._unsent or self._token_delta):
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    def pause(self, seconds: float) -> None:
        gate = self.gate
        now = time.monotonic()
        if now + seconds <= gate.paused_until + 0.1:
            return  # already known
        if gate.paused_until <= now:
            log.info("relay: cluster %s: the upstream says its rate limit is spent; pausing %.1f s", gate.settings.name, seconds)
        gate.paused_until = now + seconds
        gate.pauses += 1
        if gate.link.ok and self._pausing is None:
            self._pausing = asyncio.get_running_loop().create_task(self._share_pause())

    async def drain(self) -> None:
        """At shutdown: what is still being given back goes out (each call is bounded by redis_timeout)."""
        for task in (self._flushing, self._pausing):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)

    async def _flush(self) -> None:
        gate = self.gate
        try:
            while self._slots or self._unsent or self._token_delta:
                if not gate.link.ok:
                    gate.orphans.update(self._slots)
                    self._slots.clear()
                    self._unsent = self._token_delta = 0  # the fallback's own budget counts from now on
                    return
                slots = self._slots[:MAX_BATCH]
                del self._slots[:MAX_BATCH]
                unsent, delta = self._unsent, self._token_delta
                self._unsent = self._token_delta = 0
                try:
                    gate.slots_in_use = await gate.store.release(slots, unsent, delta)
                except gate.errors as exc:
                    gate.link.failed(exc)
                    gate.orphans.update(slots)
                else:
                    gate.link.answered()
        finally:
            self._flushing = None

    async def _share_pause(self) -> None:
        gate = self.gate
        try:
            ms = math.ceil((gate.paused_until - time.monotonic()) * 1000)
            if ms > 0:
                await gate.store.pause(ms)
        except gate.errors as exc:
            gate.link.failed(exc)
        finally:
            self._pausing = None
