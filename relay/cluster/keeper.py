"""The process's standing in the cluster: one task renews every slot the process holds (never a timer
per request) and its membership, which says how many relay processes share the limits (the fallback
splits them by that); another listens for the wakes that releases send. The renewal is also how an
outage ends: while Redis is unreachable, requests do not call it, and the renewal tries every POLL
seconds. A process that dies stops renewing, so its slots come back within `lease_seconds`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay.cluster.gate import Gate


class Keeper:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def open(self) -> None:
        """The first renewal says whether Redis is there (and the link logs it if not)."""
        await self.renew()

    def tasks(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        """What runs for as long as the process serves; wakes only matter where there are slots."""
        return [self.keep, self.listen] if self.gate.capped else [self.keep]

    async def keep(self) -> None:
        gate = self.gate
        while True:
            await asyncio.sleep(gate.renew_every if gate.link.ok else gate.poll)
            await self.renew()

    async def listen(self) -> None:
        gate = self.gate
        await gate.store.listen(gate.pid, gate.wake.set, gate.poll)

    async def renew(self) -> None:
        gate = self.gate
        drop = list(gate.orphans)
        try:
            processes, slots_in_use, now = await gate.store.renew(gate.pid, list(gate.held), drop)
        except gate.errors as exc:
            gate.link.failed(exc)
            return
        gate.orphans.difference_update(drop)
        gate.offset_ms = now - time.monotonic() * 1000
        gate.slots_in_use = slots_in_use
        gate.fallback.seen(processes)
        if gate.link.answered():
            gate.wake.set()  # waiters that the fallback held back ask Redis now

    async def close(self) -> None:
        """At shutdown (requests are over): give back what is left, leave the membership, disconnect."""
        gate = self.gate
        gate.pump.stop()
        await gate.returns.drain()
        if gate.link.ok:
            try:
                if gate.held or gate.orphans:
                    await gate.store.release([*gate.held, *gate.orphans], 0, 0)
                await gate.store.leave(gate.pid)
            except gate.errors:
                pass  # the slots expire on their own within lease_seconds
        await gate.store.close()
