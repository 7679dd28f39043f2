"""Upstream faults that tests/test_errors.py and tests/test_disconnect.py do not cover: a host that does not
resolve, an upstream that never answers while every timeout is off, kept-alive connections that the
upstream closes while idle (the race with a reuse is tests/test_keepalive_race.py), and SSE bytes cut
into awkward TCP pieces.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp.abc
import orjson
import pytest

from relay.testing import Recorded, Responder, UpstreamThread
from relay.app import create_app
from relay.config import Settings
from tests.clients import (
    CHAT_BODY,
    STREAM_BODY,
    assert_chat_completion,
    assert_openai_error,
    connect,
    exchange,
    leave_and_wait_cancelled,
    post,
    post_bytes,
)
from tests.servers import API_KEY, MODEL, RelayServer, relay_metric, relay_open_fds, serve_in_process, start_relay

RelayFactory = Callable[..., RelayServer]


# --- DNS ---------------------------------------------------------------------------------------------


class NoSuchHost(aiohttp.abc.AbstractResolver):
    """A resolver for which no name exists, so the test never asks a real DNS server; it notes each ask."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        self.asked.append(host)
        raise OSError(socket.EAI_NONAME, "Name or service not known")

    async def close(self) -> None:
        pass


def test_unresolvable_upstream_host_is_502_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    # In-process, because a resolver cannot travel through a config file to a `relay serve` process.
    settings = Settings(openai_base_url="http://upstream.invalid/v1", openai_api_key=API_KEY, openai_model=MODEL)
    resolver = NoSuchHost()
    caplog.set_level(logging.DEBUG, logger="relay")

    async def scenario() -> bytes:
        async with serve_in_process(create_app(settings, resolver=resolver)) as port:
            # The blocking raw-socket client runs in a thread, so this loop stays free to serve it.
            reply = await asyncio.to_thread(exchange, port, post_bytes(CHAT_BODY))
        error = assert_openai_error(reply, 502, "upstream_unreachable")
        assert error["type"] == "upstream_error"
        assert "upstream.invalid" in error["message"]
        return reply.body

    body = asyncio.run(scenario())
    assert resolver.asked == ["upstream.invalid"]  # asked once (no retry), and asked us, not the system
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert any("-> 502" in line and "upstream.invalid" in line for line in warnings), warnings
    assert API_KEY not in body.decode() and API_KEY not in caplog.text


# --- an upstream that never answers, with no timeout to end it ---------------------------------------


def test_client_leaving_cancels_a_silent_upstream_when_timeouts_are_off(
    relay_factory: RelayFactory, upstream: UpstreamThread
) -> None:
    # No read or total timeout: only the client's disconnect can end this exchange. Cap 1, so a slot that
    # stayed taken would make the request after it wait forever.
    server = relay_factory(read_timeout=None, total_timeout=None, max_concurrent_requests=1)
    sock = connect(server.port)
    sock.sendall(post_bytes(CHAT_BODY, headers={"x-fake-fault": "hang"}))
    assert upstream.wait_for(lambda u: len(u.requests) == 1 and u.in_flight >= 1, timeout=5)
    assert relay_metric(server, "relay_upstream_in_flight") == 1
    leave_and_wait_cancelled(sock, upstream)
    assert_chat_completion(post(server))
    assert relay_metric(server, "relay_upstream_in_flight") == 0


# --- kept-alive connections that the upstream closes --------------------------------------------------


@pytest.fixture
def fresh_relay(upstream: UpstreamThread, tmp_path: Path) -> Iterator[RelayServer]:
    """A relay of its own, with the default pool settings, whose connection pool only this test filled."""
    server = start_relay(tmp_path, upstream.base_url)
    yield server
    server.stop()


def test_upstream_closing_an_idle_pooled_connection_is_not_an_error(
    fresh_relay: RelayServer, upstream: UpstreamThread
) -> None:
    # The upstream closes idle connections after 1 s (uvicorn: 5 s); the relay's pool would keep them 4 s.
    idle_fds = relay_open_fds(fresh_relay)
    assert_chat_completion(post(fresh_relay, headers={"x-fake-idle-close-ms": "1000"}))
    assert upstream.wait_for(lambda u: u.idle_closes == 1, timeout=5), "the upstream never closed the connection"
    # The usual case: the relay has seen the close (and let go of the socket) before its next request.
    deadline = time.monotonic() + 5
    while relay_open_fds(fresh_relay) > idle_fds:
        assert time.monotonic() < deadline, "the relay kept the socket that the upstream closed"
        time.sleep(0.05)
    assert_chat_completion(post(fresh_relay))
    assert [request.path for request in upstream.upstream.requests] == ["/v1/chat/completions"] * 2



# --- SSE bytes in awkward TCP pieces -----------------------------------------------------------------

SSE_HEAD = [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")]


def sse_events(count: int) -> list[bytes]:
    # Multi-byte UTF-8 too, so a piece boundary can fall inside a character: bytes must not be decoded.
    return [b"data: %b\n\n" % orjson.dumps({"i": i, "delta": "h\u00e9 \u2603 \U0001f600"}) for i in range(count)]


def chunked(parts: list[bytes]) -> bytes:
    """HTTP/1.1 chunked framing, one chunk per part, with the terminating chunk."""
    return b"".join(b"%x\r\n%b\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


def answer_in_pieces(wire: bytes, piece: int) -> Callable[[Recorded, Responder], object]:
    """Writes the chunked body `piece` bytes at a time, pausing so each piece is a TCP read of its own."""

    async def handler(request: Recorded, responder: Responder) -> None:
        await responder.start(200, SSE_HEAD)
        for start in range(0, len(wire), piece):
            await responder.write(wire[start : start + piece])
            await asyncio.sleep(0.001)

    return handler


def answer_in_one_write(wire: bytes) -> Callable[[Recorded, Responder], object]:
    async def handler(request: Recorded, responder: Responder) -> None:
        await responder.start(200, SSE_HEAD)
        await responder.write(wire)

    return handler


@pytest.mark.parametrize("piece", [1, 7])
def test_events_split_across_many_reads_arrive_identical(
    relay: RelayServer, upstream: UpstreamThread, piece: int
) -> None:
    # The chunk framing is cut too (sizes, CRLFs), so the relay's HTTP parser sees every kind of split.
    events = sse_events(4)
    upstream.upstream.handler = answer_in_pieces(chunked(events), piece)
    reply = post(relay, STREAM_BODY)
    assert reply.status == 200
    assert reply.body == b"".join(events)


@pytest.mark.parametrize("chunking", ["chunk-per-event", "one-chunk"])
def test_many_small_events_in_one_write_arrive_identical(
    relay: RelayServer, upstream: UpstreamThread, chunking: str
) -> None:
    events = sse_events(2000)
    body = b"".join(events)
    upstream.upstream.handler = answer_in_one_write(chunked(events if chunking == "chunk-per-event" else [body]))
    reply = post(relay, STREAM_BODY)
    assert reply.status == 200
    assert reply.body == body
