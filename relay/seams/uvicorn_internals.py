"""What relay.protocol and the logs rely on inside uvicorn, behind named functions.

relay.protocol subclasses uvicorn's httptools protocol to add limits on request heads and a response head
that leaves with the first body chunk. uvicorn documents `--http` taking such a class, not the class's
insides, so the contract is (uvicorn 0.55; checked by problems() and tests/unit/test_seams.py):
- HttpToolsProtocol's parser callbacks `on_message_begin`, `on_headers_complete`, `on_body(body)`,
  `on_message_complete`, `on_response_complete` and asyncio's `connection_made`, `data_received`,
  `connection_lost` may be overridden and are called as httptools and asyncio call them;
- during a request `self.parser`, `self.url` (the raw target), `self.headers` (lower-case pairs),
  `self.scope`, `self.transport` and `self.loop` are set, and `self.cycle` is the request's
  RequestResponseCycle (None before the first), built in `on_headers_complete`;
- a cycle writes to `cycle.transport`, and has `response_complete` and `keep_alive`;
- when an app returns in the middle of a response, uvicorn logs UNFINISHED_RESPONSE at ERROR on
  "uvicorn.error" from the request's own task, then closes the connection.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import weakref

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

__all__ = ["HttpToolsProtocol"]

TESTED = "0.55"
UNFINISHED_RESPONSE = "ASGI callable returned without completing response."
_CALLBACKS = {
    "connection_made": ["self", "transport"],
    "data_received": ["self", "data"],
    "connection_lost": ["self", "exc"],
    "on_message_begin": ["self"],
    "on_headers_complete": ["self"],
    "on_body": ["self", "body"],
    "on_message_complete": ["self"],
    "on_response_complete": ["self"],
}


def response_open(cycle: RequestResponseCycle | None) -> bool:
    """A response is still going out on this connection."""
    return cycle is not None and not cycle.response_complete


def close_after_response(cycle: RequestResponseCycle) -> None:
    cycle.keep_alive = False


def write_through(cycle: RequestResponseCycle, transport: object) -> None:
    """Make the cycle write its response to `transport` instead of the connection's."""
    cycle.transport = transport  # type: ignore[assignment]


class DeliberateAborts(logging.Filter):
    """Drops uvicorn's UNFINISHED_RESPONSE line for the requests the relay ended unfinished on purpose
    (the upstream failed mid-body, which the relay has logged itself), and only for those: the line is
    logged from the request's own task, right after the app returns, so the task tells which it is."""

    def __init__(self) -> None:
        super().__init__()
        self._tasks: weakref.WeakSet[asyncio.Task[object]] = weakref.WeakSet()

    def mark(self) -> None:
        """Called by the app just before it returns unfinished on purpose."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != UNFINISHED_RESPONSE:
            return True
        try:
            task = asyncio.current_task()
        except RuntimeError:  # logged outside a loop: not ours
            return True
        if task is not None and task in self._tasks:
            self._tasks.discard(task)
            return False
        return True


deliberate_aborts = DeliberateAborts()


def install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if deliberate_aborts not in logger.filters:
        logger.addFilter(deliberate_aborts)


def untested_version() -> str | None:
    if ".".join(uvicorn.__version__.split(".")[:2]) != TESTED:
        return f"uvicorn seam: tested with uvicorn {TESTED}.x, found {uvicorn.__version__}"
    return None


def problems() -> list[str]:
    found = []
    for name, parameters in _CALLBACKS.items():
        method = getattr(HttpToolsProtocol, name, None)
        if method is None:
            found.append(f"uvicorn seam: HttpToolsProtocol.{name} is gone")
        elif list(inspect.signature(method).parameters) != parameters:
            found.append(f"uvicorn seam: HttpToolsProtocol.{name} no longer takes {tuple(parameters[1:])}")
    cycle_parameters = inspect.signature(RequestResponseCycle).parameters
    for name in ("transport", "keep_alive"):
        if name not in cycle_parameters:
            found.append(f"uvicorn seam: RequestResponseCycle no longer takes {name}")
    source = inspect.getsource(RequestResponseCycle)
    for needed in (UNFINISHED_RESPONSE, "self.response_complete", "self.transport.write"):
        if needed not in source:
            found.append(f"uvicorn seam: RequestResponseCycle no longer has {needed!r}")
    return found
