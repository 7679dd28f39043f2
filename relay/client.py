"""The process's one aiohttp session to the upstream, the slots that cap requests in flight, and the
retry policy: everything the two API endpoints share within a process."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import aiohttp.abc
from yarl import URL

from relay.config import Settings
from relay.retry import Retrier


class Slots:
    """At most `cap` upstream requests in flight (None: no cap); waiters are admitted in FIFO order.

    `take()` takes a free slot at once; when it cannot, `await wait()` waits for one and gives the seconds
    spent waiting. Either way `give_back()` returns it. Without a cap nothing is awaited at all. The counts
    are plain numbers: the metrics sample them (Metrics.flush).
    """

    def __init__(self, cap: int | None) -> None:
        self._semaphore = asyncio.Semaphore(cap) if cap else None
        self.in_flight = 0
        self.waiting = 0

    def take(self) -> bool:
        if self._semaphore is None:
            self.in_flight += 1
            return True
        return False  # acquire() is a coroutine even when a slot is free: wait() takes it

    async def wait(self) -> float:
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

    def give_back(self) -> None:
        self.in_flight -= 1
        if self._semaphore is not None:
            self._semaphore.release()


class _WithoutAutoHeaders(aiohttp.ClientRequest):
    """A request that gets no Accept, Accept-Encoding or User-Agent of aiohttp's own.

    The upstream sees the client's (forwarded like any header), or none: a client that did not ask for
    gzip never receives it. Cheaper than skip_auto_headers, which aiohttp turns into two header copies
    on every request to reach the same end.
    """

    def update_auto_headers(self, skip_auto_headers: object) -> None:
        pass


class Upstream:
    def __init__(self, settings: Settings, resolver: aiohttp.abc.AbstractResolver | None = None) -> None:
        self.settings = settings
        self.resolver = resolver
        self.base_url = settings.openai_base_url.rstrip("/")
        self.slots = Slots(settings.max_concurrent_requests)
        self.retrier = Retrier(settings.retry)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the upstream session is opened by the app's lifespan")
        return self._session

    def url(self, path: str) -> URL:
        return URL(self.base_url + path, encoded=True)

    async def open(self) -> None:
        s = self.settings
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0,  # the relay caps concurrency itself, with slots
                keepalive_timeout=s.upstream_keepalive_seconds,
                resolver=self.resolver,  # None: aiohttp's default; tests pass one that fails
            ),
            headers={
                "Authorization": f"Bearer {s.openai_api_key}",
                "Content-Type": "application/json",
                **s.openai_default_headers,
            },
            request_class=_WithoutAutoHeaders,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            # aiohttp's default is a 300 s total, which would cut a reasoning model that thinks longer.
            # read_timeout is the proxy's watchdog, not sock_read: that reschedules a timer on every read.
            timeout=aiohttp.ClientTimeout(total=s.total_timeout, connect=s.connect_timeout, sock_read=None),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
