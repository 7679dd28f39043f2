"""A response head that leaves in the same write as the first body chunk.

uvicorn writes a response head to the socket as soon as the app sends http.response.start, and the body
in a second write: two syscalls, two TCP segments and two wake-ups of the client for an answer that the
upstream sent in one. HeadWriter holds the head until the first body write or the end of the event-loop
step, whichever comes first (Go's net/http buffers it the same way, until the first body write).
"""

from __future__ import annotations

import asyncio


class HeadWriter:
    """The transport of one response cycle: its first write (the head) is held back, and leaves with
    the second write (the first body chunk) in one writev, or alone at the end of the event-loop step.
    A stream whose first event is not there yet thus gets its head at once; a buffered answer goes out
    whole. Everything else goes straight to the connection's transport."""

    __slots__ = ("_transport", "_loop", "_head", "_started")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = None
        self._started = False

    def write(self, data: bytes) -> None:
        if not self._started:
            self._started = True
            self._head = data
            self._loop.call_soon(self._flush)
        elif self._head is not None:
            head, self._head = self._head, None
            self._transport.writelines((head, data))
        else:
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def _flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            if not self._transport.is_closing():
                self._transport.write(head)
