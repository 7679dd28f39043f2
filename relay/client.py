"""The process's one aiohttp session to the upstream, and the slots that cap requests in flight."""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import AbstractAsyncContextManager

import aiohttp
from yarl import URL

from relay.config import Settings


class Upstream:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.base_url = settings.openai_base_url.rstrip("/")
        cap = settings.max_concurrent_requests
        # A plain FIFO semaphore: waiters are admitted in arrival order.
        self.slots: AbstractAsyncContextManager[object] = (
            asyncio.Semaphore(cap) if cap else contextlib.nullcontext()
        )
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
            connector=aiohttp.TCPConnector(limit=0),  # the relay caps concurrency itself, with slots
            headers={
                "Authorization": f"Bearer {s.openai_api_key}",
                "Content-Type": "application/json",
                **s.openai_default_headers,
            },
            # aiohttp would add its own User-Agent and Accept-Encoding; the client's (or none) go instead,
            # so a client that did not ask for gzip never receives it.
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            # aiohttp's default is a 300 s total, which would cut a reasoning model that thinks longer.
            timeout=aiohttp.ClientTimeout(
                total=s.total_timeout, connect=s.connect_timeout, sock_read=s.read_timeout
            ),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
