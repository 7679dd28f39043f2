"""The watchdog's timing with a fake clock: which deadline runs in which phase, when it fires, and that it
gives up once (relay.deadlines)."""

from __future__ import annotations

from collections.abc import Callable

from relay.deadlines import CLIENT, CLIENT_LEFT, IDLE, STOPPED_READING, TOO_LONG, UPSTREAM, UPSTREAM_SILENT, Watchdog, shortest


class Timer:
    def __init__(self, clock: Clock, when: float, callback: Callable[[], None]) -> None:
        self.clock, self.when, self.callback, self.cancelled = clock, when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    """The two loop methods the watchdog uses, on a time that only `advance` moves."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[Timer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(self, when, callback)
        self.timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            due = [t for t in self.timers if not t.cancelled and t.when <= end]
            if not due:
                break
            timer = min(due, key=lambda t: t.when)
            self.timers.remove(timer)
            self.now = max(self.now, timer.when)
            timer.callback()
        self.now = end


class Task:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.cancels = 0

    def get_loop(self) -> Clock:
        return self.clock

    def cancel(self) -> None:
        self.cancels += 1


def watchdog(read: float | None = 10, write: float | None = 30, total: float | None = None) -> tuple[Watchdog, Task, Clock]:
    clock = Clock()
    task = Task(clock)
    dog = Watchdog(task, (None, read, write), total, shortest(read, write, total))  # type: ignore[arg-type]
    return dog, task, clock


def test_read_timeout_runs_only_while_waiting_for_the_upstream() -> None:
    dog, task, clock = watchdog()
    clock.advance(100)  # idle (waiting for a slot, say): no deadline
    assert task.cancels == 0
    dog.waiting(UPSTREAM)
    clock.advance(9.9)
    assert task.cancels == 0
    clock.advance(0.2)
    assert (task.cancels, dog.reason) == (1, UPSTREAM_SILENT)


def test_each_chunk_restarts_the_wait_without_a_timer_of_its_own() -> None:
    dog, task, clock = watchdog()
    for _ in range(50):  # a chunk every 6 s, each within read_timeout
        dog.waiting(UPSTREAM)
        clock.advance(6)
        dog.waiting(CLIENT)
    assert task.cancels == 0
    assert len([t for t in clock.timers if not t.cancelled]) == 1  # one timer per request, re-armed


def test_a_client_that_stops_reading_is_given_up_after_client_write_timeout() -> None:
    dog, task, clock = watchdog()
    dog.waiting(CLIENT)
    clock.advance(29)
    assert task.cancels == 0
    clock.advance(2)
    assert dog.reason == STOPPED_READING


def test_total_timeout_ends_the_exchange_whatever_it_waits_for() -> None:
    dog, task, clock = watchdog(read=None, write=None, total=5)
    dog.waiting(IDLE)
    clock.advance(4.9)
    assert task.cancels == 0
    clock.advance(0.2)
    assert dog.reason == TOO_LONG


def test_gives_up_once_and_keeps_the_first_reason() -> None:
    dog, task, clock = watchdog()
    dog.client_left()
    dog.waiting(UPSTREAM)
    clock.advance(60)
    dog.client_left()
    assert (task.cancels, dog.reason) == (1, CLIENT_LEFT)


def test_without_deadlines_no_timer_is_armed_and_stop_is_safe() -> None:
    dog, task, clock = watchdog(read=None, write=None)
    assert clock.timers == []
    dog.waiting(UPSTREAM)
    clock.advance(10_000)
    dog.stop()
    assert task.cancels == 0


def test_stop_cancels_the_timer() -> None:
    dog, task, clock = watchdog()
    dog.waiting(UPSTREAM)
    dog.stop()
    clock.advance(60)
    assert task.cancels == 0
