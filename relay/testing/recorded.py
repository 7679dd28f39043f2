"""What the fake upstream received: ``Recorded`` (one request as read off the socket); the ``Handler``
type a test installs as ``FakeUpstream.handler`` to write responses itself; and ``Ending``, how an
answer leaves its connection (kept alive, closed, reset, or left hanging)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson

if TYPE_CHECKING:
    from relay.testing.responder import Responder

Ending = Literal["finish", "close", "abort", "hang"]
Handler = Callable[["Recorded", "Responder"], Awaitable[None]]


@dataclass(slots=True)
class Recorded:
    """One request as received."""

    method: str
    path: str  # with the query string, as received
    headers: list[tuple[str, str]]  # lower-cased names, in order, latin-1 decoded
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)

    def json(self) -> Any:
        return orjson.loads(self.body)
