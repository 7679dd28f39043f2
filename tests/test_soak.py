"""A soak: many concurrent clients for SOAK_SECONDS (default 15; `make soak` runs 120) against one relay
process, with 10% upstream faults mixed in (reset before the headers, reset mid-stream, a hang that
read_timeout ends, 429). Every answer must be the one its request calls for, and afterwards nothing may
have leaked: the relay's memory at the end is within 10% of what it was after the warm-up, its open file
descriptors are back to what they were before the load, and its in-flight gauge is back to 0.

The relay and the fake upstream are this test's own (the upstream does not record requests, so a long
soak does not fill this process's memory). A warm-up of SOAK_WARMUP_SECONDS (default 8) comes first.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest

from relay.testing import UpstreamThread
from tests.servers import MODEL, RelayServer, relay_metric, relay_open_fds, relay_rss, start_relay

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "15"))
WARMUP_SECONDS = float(os.environ.get("SOAK_WARMUP_SECONDS", "8"))
CLIENTS = 128
READ_TIMEOUT = 1  # the relay's read_timeout: how long a hung upstream request holds its client
RSS_GROWTH = 0.10  # after the run, at most this much above the RSS after the warm-up
SETTLE_SECONDS = 15.0  # to let pooled upstream connections expire (keep-alive 1 s here) after the load
MiB = 1024 * 1024


@dataclass(frozen=True)
class Kind:
    """One kind of request in the mix and the answer it must get."""

    name: str
    path: str
    payload: dict[str, object]
    directives: tuple[tuple[str, str], ...] = ()
    status: int = 200
    code: str | None = None  # for the relay's own errors: the error code
    truncated: bool = False  # the body must end before its framing says it is complete

    def body(self, model: str) -> bytes:
        return orjson.dumps({**self.payload, "model": model})

    def headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json", **dict(self.directives)}


CHAT = {"messages": [{"role": "user", "content": "hi"}]}
CHAT_STREAM = {**CHAT, "stream": True}
FAULT = "x-fake-fault"
NORMAL = (
    Kind("chat", "/chat/completions", CHAT),
    Kind("chat-stream", "/chat/completions", CHAT_STREAM),
    Kind("responses-stream", "/responses", {"input": "hi", "stream": True}),
)
FAULTS = (
    Kind("reset-before-headers", "/chat/completions", CHAT, ((FAULT, "reset-before-headers"),), 502,
         "upstream_disconnected"),
    Kind("reset-mid-stream", "/chat/completions", CHAT_STREAM, ((FAULT, "reset-mid-stream"),), truncated=True),
    Kind("hang", "/chat/completions", CHAT, ((FAULT, "hang"),), 504, "upstream_timeout"),
    Kind("429", "/chat/completions", CHAT, (("x-fake-status", "429"),), 429),
)
# 40 requests: 36 normal ones and one of each fault, i.e. 10% faults. Each client starts at another place.
SCHEDULE = [*(NORMAL * 12), *FAULTS]
# The warm-up is all faults (but the slow hang): the cyclic garbage of failed exchanges (exceptions and their
# tracebacks) waits for the relay's infrequent garbage collections, so fault traffic is what takes the
# relay's memory longest to reach its plateau, and the soak is about growth beyond the plateau.
WARMUP_SCHEDULE = [kind for kind in FAULTS if kind.name != "hang"]


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)

    def check(self, kind: Kind, ok: bool, what: str) -> None:
        if ok:
            self.outcomes[kind.name] += 1
        elif len(self.wrong) < 20:  # enough to diagnose, not enough to drown the report
            self.wrong.append(f"{kind.name}: {what}")


async def _one(
    session: aiohttp.ClientSession, relay: RelayServer, kind: Kind, expected: bytes | None, tally: Tally
) -> None:
    url = relay.api_url + kind.path
    try:
        async with session.post(url, data=kind.body("client-model"), headers=kind.headers()) as response:
            try:
                body = await response.read()
            except aiohttp.ClientPayloadError:
                tally.check(kind, kind.truncated and response.status == 200, f"{response.status}, truncated")
                return
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.check(kind, False, f"{type(exc).__name__}: {exc}")
        return
    if kind.code is not None:
        code = orjson.loads(body)["error"]["code"] if response.status == kind.status else None
        tally.check(kind, code == kind.code, f"{response.status} {body[:200]!r}")
    else:
        tally.check(kind, (response.status, body) == (kind.status, expected), f"{response.status}, {len(body)} bytes")


async def _direct(session: aiohttp.ClientSession, upstream: UpstreamThread, kind: Kind) -> bytes:
    """What the upstream itself answers (with the configured model, which the fake echoes)."""
    async with session.post(upstream.base_url + kind.path, data=kind.body(MODEL), headers=kind.headers()) as response:
        assert response.status == kind.status
        return await response.read()


@dataclass
class Samples:
    """The relay measured near the end of a phase, while still under its load."""

    rss: int
    fds: int


async def _phase(
    session: aiohttp.ClientSession,
    relay: RelayServer,
    schedule: list[Kind],
    seconds: float,
    expected: dict[str, bytes],
    tally: Tally,
) -> Samples:
    """CLIENTS clients send `schedule` round and round (each starting elsewhere in it) for `seconds`."""
    stop_at = time.monotonic() + seconds

    async def client(kinds: Iterator[Kind]) -> None:
        while time.monotonic() < stop_at:
            kind = next(kinds)
            await _one(session, relay, kind, expected.get(kind.name), tally)

    clients = [
        asyncio.create_task(client(itertools.islice(itertools.cycle(schedule), n % len(schedule), None)))
        for n in range(CLIENTS)
    ]
    await asyncio.sleep(max(0.0, seconds - 0.5))
    samples = Samples(relay_rss(relay), relay_open_fds(relay))
    await asyncio.gather(*clients)
    return samples


async def _soak(relay: RelayServer, upstream: UpstreamThread) -> tuple[Tally, Samples, Samples]:
    """The warm-up, then the soak proper; the tally of every answer, and the relay after each phase."""
    tally = Tally()
    timeout = aiohttp.ClientTimeout(total=READ_TIMEOUT + 30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        expected = {kind.name: await _direct(session, upstream, kind) for kind in (*NORMAL, FAULTS[-1])}
        warm = await _phase(session, relay, WARMUP_SCHEDULE, WARMUP_SECONDS, expected, tally)
        end = await _phase(session, relay, SCHEDULE, SOAK_SECONDS, expected, tally)
    return tally, warm, end


def wait_until(check: Callable[[], bool], what: str, timeout: float = SETTLE_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"after the soak: {what}"
        time.sleep(0.1)


@pytest.fixture
def soak_upstream() -> Iterator[UpstreamThread]:
    with UpstreamThread(record=False) as thread:
        yield thread


@pytest.fixture
def soak_relay(soak_upstream: UpstreamThread, tmp_path: Path) -> Iterator[RelayServer]:
    # A short pool keep-alive, so idle upstream connections close (and their descriptors go) soon after.
    server = start_relay(tmp_path, soak_upstream.base_url, read_timeout=READ_TIMEOUT, upstream_keepalive_seconds=1)
    yield server
    server.stop()


def test_soak_with_faults_leaks_nothing(soak_relay: RelayServer, soak_upstream: UpstreamThread) -> None:
    idle_fds = relay_open_fds(soak_relay)
    tally, warm, end = asyncio.run(_soak(soak_relay, soak_upstream))

    assert tally.wrong == [], f"{len(tally.wrong)}+ wrong answers; answered right: {dict(tally.outcomes)}"
    missing = {kind.name for kind in SCHEDULE} - set(tally.outcomes)
    assert not missing, f"never exercised: {missing}"
    print(f"soak {WARMUP_SECONDS:.0f}+{SOAK_SECONDS:.0f} s: {sum(tally.outcomes.values())} requests "
          f"{dict(tally.outcomes)}; relay RSS {warm.rss / MiB:.1f} MiB after the warm-up, {end.rss / MiB:.1f} MiB "
          f"at the end; fds {idle_fds} idle, {end.fds} under load")
    grown = f"relay RSS grew from {warm.rss / MiB:.1f} to {end.rss / MiB:.1f} MiB"
    assert end.rss <= warm.rss * (1 + RSS_GROWTH), grown

    assert relay_metric(soak_relay, "relay_upstream_in_flight") == 0
    assert relay_metric(soak_relay, "relay_slot_waiting") == 0
    wait_until(lambda: soak_upstream.upstream.in_flight == 0, "the upstream still has requests in flight")
    assert end.fds > idle_fds + CLIENTS // 2  # the load did hold sockets, so their release means something
    wait_until(lambda: relay_open_fds(soak_relay) <= idle_fds, f"the relay holds more than its {idle_fds} idle fds")
    log = soak_relay.log()
    assert "Traceback" not in log, log[-3000:]  # (uvicorn logs each deliberate mid-body abort as ERROR)
