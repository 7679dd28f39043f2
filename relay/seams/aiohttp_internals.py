"""The parts of aiohttp the upstream call uses below ClientSession, behind named functions.

relay.upstream writes each request head itself and reads the answer with aiohttp's own machinery: the
connector (pool, DNS, TLS, connect deadline) and the connection's response protocol (the C parser, a
StreamReader with flow control). ClientSession.request cost more CPU per request than the rest of the
relay together (cookie jar, redirect loop, tracing, payload and wrapper objects); this path does not.

Contracts (aiohttp 3.14; each is checked by problems() and by tests/unit/test_seams.py):
- `pool_key(url)`: a session-less ClientRequest; `connector.connect(key, [], timeout)` pools on its
  connection_key, so one key per upstream address is enough.
- A Connection's `protocol` is a ResponseHandler (None once it is gone) and its `transport` the socket's.
- `expect_answer(protocol)`: `set_response_params(read_until_eof=True, auto_decompress=False)` gives the
  protocol its parser for the next answer; `read()` then yields `(RawResponseMessage, StreamReader)`.
- `protocol.should_close` is true once the connection holds anything but a finished exchange; `closed`
  is a future set when the connection is lost (None if it was lost before anyone asked); `abort()` drops
  it without waiting for unsent bytes.
- `ServerDisconnectedError.message` is the half-parsed answer when one had begun, else a string.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import operator
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.connector import Connection
from aiohttp.http import RawResponseMessage
from yarl import URL

__all__ = ["Connection", "RawResponseMessage", "ResponseHandler"]

TESTED = "3.14"


def pool_key(url: URL) -> aiohttp.ClientRequest:
    """What connector.connect() takes to stand for the upstream's address (built once per endpoint)."""
    return aiohttp.ClientRequest("POST", url, loop=asyncio.get_running_loop())


def take_connection(
    connector: aiohttp.TCPConnector, key: aiohttp.ClientRequest, timeout: aiohttp.ClientTimeout
) -> Awaitable[Connection]:
    """A pooled connection (the oldest idle one) or a new one, within timeout.connect: the connector's own
    coroutine, awaited by the caller (no frame of ours on every request). A connect timeout raises
    TimeoutError, which `connect_timeout(key)` turns into what ClientSession raises."""
    return connector.connect(key, [], timeout)


def connect_timeout(key: aiohttp.ClientRequest) -> aiohttp.ConnectionTimeoutError:
    return aiohttp.ConnectionTimeoutError(f"Connection timeout to host {key.url}")


# The per-request calls are C-level callables (a partial, attrgetters): named seams that cost no Python
# frame on every request.

# Give the connection a parser for the next answer: bytes as sent (no decompression), and a body without
# framing read to the connection's end. expect_answer(protocol)
expect_answer = functools.partial(ResponseHandler.set_response_params, read_until_eof=True, auto_decompress=False)


async def final_answer(protocol: ResponseHandler) -> tuple[RawResponseMessage, aiohttp.StreamReader]:
    """The response head after any informational (1xx) ones, as ClientResponse.start reads it."""
    while True:
        message, payload = await protocol.read()
        if not 100 <= message.code < 200 or message.code == 101:
            return message, payload


# The pooled connection holds something besides a finished exchange (an unsolicited answer).
is_dirty: Callable[[ResponseHandler], bool] = operator.attrgetter("should_close")
# A future set when the connection is lost (None if it was lost before anyone asked).
closed_future: Callable[[ResponseHandler], asyncio.Future[None] | None] = operator.attrgetter("closed")


def drop(connection: Connection) -> None:
    """Close a connection now: a graceful close would wait for the upstream to read what is unsent."""
    if connection.protocol is not None:
        connection.protocol.abort()
    connection.close()


def fail_body(payload: aiohttp.StreamReader, message: str) -> None:
    """End a body that is still waiting for bytes with an error, as the connection is gone."""
    if not payload.is_eof() and payload.exception() is None:
        payload.set_exception(aiohttp.ClientPayloadError(message))


def nothing_received(exc: BaseException) -> bool:
    """The connection ended before any byte of an answer: a clean close with no message begun, or a
    reset (the kernel reports a reset instead of any bytes that may have preceded it)."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return not isinstance(exc.message, RawResponseMessage)
    return isinstance(exc, aiohttp.ClientOSError)


def untested_version() -> str | None:
    if ".".join(aiohttp.__version__.split(".")[:2]) != TESTED:
        return f"aiohttp seam: tested with aiohttp {TESTED}.x, found {aiohttp.__version__}"
    return None


def problems() -> list[str]:
    found = []
    expected = {
        aiohttp.TCPConnector.connect: ["self", "req", "traces", "timeout"],
        ResponseHandler.set_response_params: None,
        ResponseHandler.read: ["self"],
        ResponseHandler.abort: ["self"],
        aiohttp.StreamReader.set_exception: None,
    }
    for function, parameters in expected.items():
        found += _signature_problems(function, parameters)
    params = inspect.signature(ResponseHandler.set_response_params).parameters
    for name in ("read_until_eof", "auto_decompress"):
        if name not in params:
            found.append(f"aiohttp seam: ResponseHandler.set_response_params() takes no {name}")
    if not inspect.iscoroutinefunction(ResponseHandler.read):
        found.append("aiohttp seam: ResponseHandler.read() is no longer a coroutine")
    for cls, names in (
        (ResponseHandler, ("closed", "should_close")),
        (Connection, ("protocol", "transport")),
    ):
        for name in names:
            if not isinstance(inspect.getattr_static(cls, name, None), property):
                found.append(f"aiohttp seam: {cls.__name__}.{name} is not a property any more")
    if "message" not in inspect.signature(aiohttp.ServerDisconnectedError).parameters:
        found.append("aiohttp seam: ServerDisconnectedError no longer takes the half-parsed message")
    return found


def _signature_problems(function: object, parameters: list[str] | None) -> list[str]:
    name = getattr(function, "__qualname__", repr(function))
    if not callable(function):
        return [f"aiohttp seam: {name} is gone"]
    if parameters is None:
        return []
    actual = list(inspect.signature(function).parameters)
    if actual[: len(parameters)] != parameters:
        return [f"aiohttp seam: {name}{tuple(actual)} no longer takes {tuple(parameters)}"]
    return []
