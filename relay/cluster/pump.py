"""Admitting: the waiters of one process, in arrival order, and the one task (the pump) that asks Redis
for the first of them at a time, or the process's fallback while Redis is unreachable. One call admits
a whole batch, so under load a process makes far fewer calls than it admits requests, and it never
holds more than one connection for it."""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relay.cluster.budget import REFUSED_FOR, Admitted
from relay.cluster.refusals import refusal

if TYPE_CHECKING:
    from relay.cluster.gate import Gate

MAX_BATCH = 256  # waiters per admit call, slot ids per release call: well within the Lua stack of the scripts


@dataclass(slots=True)
class Waiter:
    future: asyncio.Future[Any]  # -> (slot id or None, seconds to wait), or a refusal (Failure)
    cost: int  # tokens charged before the answer
    arrival: float  # time.monotonic()
    deadline: float


class Pump:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.waiters: collections.deque[Waiter] = collections.deque()
        self.queued = False  # this process has a place in the cluster's queue
        self._slot_ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None  # held here: the loop keeps only weak references

    def enqueue(self, waiter: Waiter) -> None:
        self.waiters.append(waiter)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def forget(self, waiter: Waiter) -> None:
        if self.waiters and self.waiters[0] is waiter:
            self.waiters.popleft()
        else:
            try:
                self.waiters.remove(waiter)
            except ValueError:
                pass  # it left (cancelled) while a call was out

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        gate = self.gate
        try:
            while True:
                self._expire()
                if not gate.link.ok:
                    self.queued = False  # Redis cannot be told; the place in its queue expires on its own
                if not self.waiters and not self.queued:
                    return
                batch = list(itertools.islice(self.waiters, MAX_BATCH))
                gate.wake.clear()
                if not gate.link.ok and gate.refuse_when_down:
                    self._refuse_all()
                    continue
                slots = [f"{gate.pid}:{next(self._slot_ids)}" if gate.capped else "" for _ in batch]
                admitted = await self._ask(batch, slots)
                if admitted is None:
                    continue  # Redis failed: the next round decides by the fallback
                self._settle(batch, slots, admitted)
                if admitted.reason == 0 and admitted.taken < len(batch):
                    await self._sleep_until_woken()  # no slot: until a release, or POLL
        finally:
            self._task = None

    async def _ask(self, batch: list[Waiter], slots: list[str]) -> Admitted | None:
        gate = self.gate
        now = time.monotonic()
        if not gate.link.ok:
            entries = [(w.cost, (w.deadline - now) * 1000) for w in batch]
            admitted = gate.fallback.admit(entries, len(gate.held), now * 1000, gate.paused_until * 1000)
        else:
            offset = gate.offset_ms
            calls = [
                (slot, w.cost, int((w.deadline - now) * 1000), int(w.arrival * 1000 + offset) if offset is not None else 0)
                for slot, w in zip(slots, batch)
            ]
            pause_ms = max(0, int((gate.paused_until - now) * 1000))
            try:
                admitted = await gate.store.admit(gate.pid, pause_ms, len(self.waiters), calls)
            except gate.errors as exc:
                gate.link.failed(exc)
                return None
            gate.offset_ms = admitted.now - time.monotonic() * 1000
            gate.link.answered()
            self.queued = admitted.queued
        gate.slots_in_use = admitted.slots_in_use
        gate.budget_left = (admitted.requests_left, admitted.tokens_left)
        return admitted

    def _settle(self, batch: list[Waiter], slots: list[str], admitted: Admitted) -> None:
        gate = self.gate
        for waiter, slot, wait in zip(batch, slots, admitted.waits):
            self.forget(waiter)
            held = slot or None
            if held is not None:
                gate.held.add(held)
            if waiter.future.done():  # cancelled while Redis answered: it used nothing
                gate.returns.give_back(held, 1, -waiter.cost)
            else:
                waiter.future.set_result((held, wait / 1000))
        if admitted.reason:
            waiter = batch[admitted.taken]
            self.forget(waiter)
            if not waiter.future.done():
                waiter.future.set_result(refusal(REFUSED_FOR[admitted.reason], admitted.refused_wait / 1000, gate.settings))

    def _expire(self) -> None:
        """Waiters whose max_wait_seconds passed without a slot: deadlines come in arrival order."""
        now = time.monotonic()
        while self.waiters and self.waiters[0].deadline <= now:
            waiter = self.waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(refusal("busy", 1.0, self.gate.settings))

    def _refuse_all(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(refusal("unavailable", 1.0, self.gate.settings))

    async def _sleep_until_woken(self) -> None:
        timeout = self.gate.poll
        if self.waiters:
            timeout = min(timeout, max(0.0, self.waiters[0].deadline - time.monotonic()))
        try:
            async with asyncio.timeout(timeout):
                await self.gate.wake.wait()
        except TimeoutError:
            pass
