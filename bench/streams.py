"""Stream clients that look at each event: timing fidelity and many open streams.

A throughput generator only sees whole responses. Here each SSE event's arrival time is recorded at the
client (an event is complete when its blank line arrives), and each body is hashed, so the relay can be
compared with the upstream event by event and byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

_EVENT_END = b"\n\n"


@dataclass
class StreamTiming:
    status: int = 0
    ttfb: float = float("nan")  # seconds from sending the request to the first body byte
    events: list[float] = field(default_factory=list)  # seconds from sending to each complete event
    digest: str = ""
    size: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    def gaps(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.events, self.events[1:], strict=False)]


def _session(limit: int, timeout: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        timeout=aiohttp.ClientTimeout(total=timeout),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )


async def fetch_digest(url: str, body: bytes, headers: dict[str, str], timeout: float = 30.0) -> tuple[int, str]:
    """One request's status and body hash."""
    async with _session(1, timeout) as session, session.post(url, data=body, headers=headers) as response:
        return response.status, hashlib.sha256(await response.read()).hexdigest()


async def timed_stream(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> StreamTiming:
    timing = StreamTiming()
    digest = hashlib.sha256()
    sent = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as response:
            timing.status = response.status
            previous_last = b""
            async for chunk in response.content.iter_any():
                now = time.perf_counter() - sent
                if timing.size == 0:
                    timing.ttfb = now
                digest.update(chunk)
                timing.size += len(chunk)
                # An event boundary may straddle two chunks; the previous chunk's last byte covers that.
                timing.events.extend([now] * (previous_last + chunk).count(_EVENT_END))
                previous_last = chunk[-1:]
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        timing.error = type(exc).__name__
    timing.digest = digest.hexdigest()
    return timing


async def fidelity_round(
    url: str, body: bytes, headers: dict[str, str], streams: int, warm_body: bytes, timeout: float = 60.0
) -> list[StreamTiming]:
    """`streams` concurrent timed streams, on connections opened (and, through a relay, pooled) beforehand."""
    async with _session(streams, timeout) as session:

        async def warm() -> None:
            async with session.post(url, data=warm_body, headers={"Content-Type": "application/json"}) as response:
                await response.read()

        # Connection set-up is not what is compared; the first event of a warm stream is.
        await asyncio.gather(*(warm() for _ in range(streams)))
        return list(await asyncio.gather(*(timed_stream(session, url, body, headers) for _ in range(streams))))


@dataclass
class ManyStreams:
    streams: int
    completed: int = 0  # 200, whole body, identical to the reference
    peak_open: int = 0  # streams whose headers had arrived and whose body had not ended, at once
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


async def many_streams(
    url: str,
    body: bytes,
    headers: dict[str, str],
    count: int,
    opens_per_second: float,
    expected_digest: str,
    timeout: float,
    on_progress: Callable[[int, int], None] | None = None,
) -> ManyStreams:
    """Open `count` slow streams at a bounded rate (a burst would overflow accept queues, which measures
    the kernel rather than the relay) and hold them open together until each completes."""
    result = ManyStreams(streams=count)
    errors: Counter[str] = Counter()
    open_now = 0
    started = time.perf_counter()

    async def one(index: int, session: aiohttp.ClientSession) -> None:
        nonlocal open_now
        await asyncio.sleep(index / opens_per_second)
        digest = hashlib.sha256()
        try:
            async with session.post(url, data=body, headers=headers) as response:
                if response.status != 200:
                    errors[f"status {response.status}"] += 1
                    return
                open_now += 1
                result.peak_open = max(result.peak_open, open_now)
                try:
                    async for chunk in response.content.iter_any():
                        digest.update(chunk)
                finally:
                    open_now -= 1
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            errors[type(exc).__name__] += 1
            return
        if digest.hexdigest() == expected_digest:
            result.completed += 1
        else:
            errors["bytes differ"] += 1

    async def report() -> None:
        while on_progress is not None:
            on_progress(open_now, result.completed)
            await asyncio.sleep(0.25)

    async with _session(0, timeout) as session:
        reporter = asyncio.create_task(report())
        try:
            await asyncio.gather(*(one(i, session) for i in range(count)))
        finally:
            reporter.cancel()
    result.errors = dict(errors)
    result.seconds = time.perf_counter() - started
    return result


async def sample_peak(read: Callable[[], int], interval: float, stop: asyncio.Event) -> dict[str, Any]:
    """Poll `read` (e.g. a process's RSS) until `stop` is set; keep the largest value seen."""
    peak = read()
    samples = 1
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        peak = max(peak, read())
        samples += 1
    return {"peak": peak, "samples": samples}
