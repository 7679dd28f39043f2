"""What relay.protocol tells a request about its client's connection, through the ASGI scope.

Under `relay serve` (or uvicorn with `--http relay.protocol:GuardedHttpToolsProtocol`) every request's
scope carries one under CLIENT_KEY; under plain uvicorn there is none, and the app falls back to ASGI
alone (a task waiting in receive() to hear of a disconnect, a deadline on reading the body).
"""

from __future__ import annotations

from collections.abc import Callable

CLIENT_KEY = "relay.client"


class ClientConnection:
    """One request's view of its client connection, set up by the protocol for the app."""

    __slots__ = ("abort", "body_complete", "lost", "_on_lost")

    def __init__(self, abort: Callable[[], None]) -> None:
        self.abort = abort  # close now, dropping whatever the client has not read
        self.body_complete = False  # the whole request body has arrived
        self.lost = False
        self._on_lost: Callable[[], None] | None = None

    def watch(self, on_lost: Callable[[], None]) -> None:
        """Call `on_lost` once if the connection is lost (at once if it already is), until unwatch()."""
        if self.lost:
            on_lost()
        else:
            self._on_lost = on_lost

    def unwatch(self) -> None:
        self._on_lost = None

    def connection_lost(self) -> None:
        self.lost = True
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost()
