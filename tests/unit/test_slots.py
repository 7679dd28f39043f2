"""The per-process concurrency cap: FIFO admission, counts, no wait without a cap (relay.slots)."""

from __future__ import annotations

import asyncio

from relay.slots import Slots


def test_without_a_cap_nothing_waits() -> None:
    slots = Slots(None)
    assert all(slots.acquire_now() for _ in range(1000))
    assert slots.in_flight == 1000
    for _ in range(1000):
        slots.release()
    assert slots.in_flight == 0


def test_waiters_are_admitted_in_arrival_order() -> None:
    async def scenario() -> list[int]:
        slots = Slots(2)
        order: list[int] = []

        async def request(number: int) -> None:
            if not slots.acquire_now():
                await slots.acquire()
            order.append(number)
            await asyncio.sleep(0.001 * (5 - number % 5))  # they finish in another order than they began
            slots.release()

        tasks = []
        for number in range(10):
            tasks.append(asyncio.create_task(request(number)))
            await asyncio.sleep(0)  # arrive one after the other
        assert slots.in_flight == 2 and slots.waiting == 8
        await asyncio.gather(*tasks)
        assert (slots.in_flight, slots.waiting) == (0, 0)
        return order

    assert asyncio.run(scenario()) == list(range(10))


def test_a_cancelled_waiter_leaves_the_queue_and_takes_nothing() -> None:
    async def scenario() -> tuple[int, int]:
        slots = Slots(1)
        await slots.acquire()
        waiter = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        slots.release()
        free = await asyncio.wait_for(slots.acquire(), 1)  # the slot is there for the next one
        return slots.in_flight, int(free)

    assert asyncio.run(scenario()) == (1, 0)
