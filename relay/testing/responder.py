"""``Responder``: what a test's custom handler writes one response with, raw or chunk-framed."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from relay.testing.canned import _CHUNK_END, _frame, _status_line

if TYPE_CHECKING:
    from relay.testing.connection import _Connection

class Responder:
    """What a custom handler writes one response with."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.started = False

    @property
    def closed(self) -> asyncio.Future[None]:
        """Resolves when the connection is gone, whoever closed it."""
        return self._connection.closed

    async def start(self, status: int = 200, headers: Sequence[tuple[str, str]] = ()) -> None:
        """Write the status line and exactly these headers; framing is the handler's choice."""
        self.started = True
        lines = [_status_line(status), *(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers), b"\r\n"]
        await self.write(b"".join(lines))

    async def write(self, data: bytes) -> None:
        """Write raw bytes; a no-op once the connection is gone."""
        await self._connection.send(data)

    async def chunk(self, data: bytes) -> None:
        """Write one HTTP/1.1 chunk (an empty one would end the body, so it is skipped)."""
        if data:
            await self.write(_frame(data))

    async def end_chunks(self) -> None:
        await self.write(_CHUNK_END)

    def abort(self) -> None:
        self._connection.abort()

    async def wait(self, event: threading.Event, timeout: float = 10.0) -> bool:
        """Wait for a test thread to set ``event`` without blocking this loop; False on timeout."""
        if event.is_set():
            return True
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[bool] = loop.create_future()

        def settle(result: bool) -> None:
            if not outcome.done():  # the handler may have been cancelled meanwhile
                outcome.set_result(result)

        def block() -> None:
            result = event.wait(timeout)
            with contextlib.suppress(RuntimeError):  # the loop may be closed by now
                loop.call_soon_threadsafe(settle, result)

        # A thread per wait rather than the default executor: its few workers would make
        # many concurrently waiting handlers queue behind each other, and they are not daemons.
        threading.Thread(target=block, name="fake-upstream-wait", daemon=True).start()
        return await outcome

    async def wait_closed(self, timeout: float = 10.0) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            return False
        return True
