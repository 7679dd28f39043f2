"""The fake upstream server: ``FakeUpstream`` on the running loop, ``UpstreamThread`` for synchronous
code (a FakeUpstream on its own loop in a daemon thread), and the loopback-only bind check."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from relay.testing.connection import _Connection
from relay.testing.recorded import Handler, Recorded

class FakeUpstream:
    """The server. State is mutated only on its loop; other threads may read it."""

    def __init__(self, record: bool = True, name: str = "") -> None:
        """`name` goes into each answer's x-request-id (req_<name>_<n>), so a client can tell which of
        several fake upstreams answered."""
        self.record = record
        self._id_prefix = f"{name}_".encode() if name else b""
        self.requests: list[Recorded] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.disconnects = 0
        self.idle_closes = 0  # kept-alive connections closed after x-fake-idle-close-ms of idleness
        self.unread_closes = 0  # connections closed unread on a new request (close-when-reused)
        self.handler: Handler | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._request_ids = itertools.count(1)
        self._epoch = 0

    def reset(self) -> None:
        """Forget requests, counters and the handler. ``in_flight`` is a live gauge and stays."""
        self._epoch += 1
        self.requests.clear()
        self.max_in_flight = self.in_flight
        self.disconnects = 0
        self.idle_closes = 0
        self.unread_closes = 0
        self.handler = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on a loopback address and return the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self, loop), _loopback(host), port, reuse_address=True, backlog=1024
        )
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in list(self._connections):
            connection.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    def _began(self) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _next_request_id(self) -> bytes:
        return self._id_prefix + b"%d" % next(self._request_ids)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        # The loop only keeps weak references to tasks; stop() also needs to find them.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _loopback(host: str) -> str:
    # "localhost" may resolve to both 127.0.0.1 and ::1, which with port 0 would give two ports.
    if host == "localhost":
        return "127.0.0.1"
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the fake upstream only binds loopback addresses, not {host!r}")
    return host


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class UpstreamThread:
    """A FakeUpstream on its own event loop in a daemon thread, for synchronous test code."""

    def __init__(self, record: bool = True, port: int = 0) -> None:
        """`port`: 0 for a free one, or a given one (a test brings an upstream back where it was)."""
        self.upstream = FakeUpstream(record)
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> UpstreamThread:
        ready = threading.Event()
        failures: list[BaseException] = []

        def run() -> None:
            loop = self._loop = _new_loop()
            try:
                self.port = loop.run_until_complete(self.upstream.start(port=self.port))
            except BaseException as exc:  # handed to the starting thread, which re-raises it
                failures.append(exc)
                loop.close()
                return
            finally:
                ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake upstream did not start within 10 s")
        if failures:
            self._thread = None
            raise failures[0]
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.upstream.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None

    def wait_for(self, predicate: Callable[[FakeUpstream], bool], timeout: float = 5.0) -> bool:
        """Poll ``predicate`` until it holds or ``timeout`` seconds pass; report which."""
        deadline = time.monotonic() + timeout
        while not predicate(self.upstream):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def __enter__(self) -> UpstreamThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
