"""The relay's own clocks: `total_timeout` bounds a whole exchange (before the response: 504; during the
body: the client's connection is cut, as for any failure mid-body), and `request_body_timeout` bounds a
client that never finishes sending its body (408, connection closed, nothing forwarded), and
`client_write_timeout` bounds a client that stops reading its response.

(connect_timeout is not tested here: it needs an address that drops SYNs, which 127.0.0.1 never does.)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from relay.testing import Recorded, Responder, UpstreamThread
from tests.clients import (
    CHAT,
    CHAT_BODY,
    STREAM_BODY,
    assert_closed_by_peer,
    assert_openai_error,
    connect,
    post,
    post_bytes,
    read_head,
    read_reply,
    read_to_end,
    request_head,
    requests_seen,
)
from tests.servers import PLAIN_UVICORN, RELAY_SERVE, RelayServer, relay_open_fds

EVENTS = 30  # at 300 ms apart: 9 s of stream, far beyond the 1 s total


@pytest.fixture(scope="module")
def hasty(relay_factory: Callable[..., RelayServer]) -> RelayServer:
    return relay_factory(total_timeout=1, request_body_timeout=1)


def test_total_timeout_before_the_response_is_504(hasty: RelayServer, upstream: UpstreamThread) -> None:
    assert_openai_error(post(hasty, headers={"x-fake-fault": "hang"}), 504, "upstream_timeout")
    requests_seen(upstream, 1)


def test_total_timeout_cuts_a_slow_stream(hasty: RelayServer, upstream: UpstreamThread) -> None:
    # Each event alone arrives well within any read timeout; only the whole exchange is too long.
    slow = {"x-fake-events": str(EVENTS), "x-fake-event-delay-ms": "300"}
    with connect(hasty.port) as sock:
        sock.sendall(post_bytes(STREAM_BODY, headers=slow))
        response = read_head(sock)
        assert response.status == 200  # the head went out before the clock ran out
        body, complete = read_to_end(response)
    assert not complete, f"a cut stream of {len(body)} bytes was relayed as if complete"
    assert b"data: " in body and b"[DONE]" not in body
    # The relay gave up on the upstream too: its connection was closed, not left streaming.
    assert upstream.wait_for(lambda u: u.disconnects >= 1)


# The body's deadline is the app's own, whether or not relay.protocol serves the request.
@pytest.mark.parametrize("launcher", [RELAY_SERVE, PLAIN_UVICORN])
def test_stalled_request_body_is_408(
    relay_factory: Callable[..., RelayServer], upstream: UpstreamThread, launcher: str
) -> None:
    hasty = relay_factory(total_timeout=1, request_body_timeout=1, launcher=launcher)
    with connect(hasty.port) as sock:
        # Content-Length 100, then only 10 bytes, then nothing: a client that stalled (or a slowloris).
        sock.sendall(request_head("POST", CHAT, {"Content-Type": "application/json"}, length=100) + CHAT_BODY[:10])
        reply = read_reply(sock)
        assert_openai_error(reply, 408, "request_timeout")
        assert (reply.header("connection") or "").lower() == "close"
        # The relay hung up: the other 90 bytes would never be read as the next request.
        assert_closed_by_peer(sock)
    assert upstream.upstream.requests == []


def test_body_that_arrives_in_time_is_relayed(hasty: RelayServer, upstream: UpstreamThread) -> None:
    # The other side of 408: a body in two pieces within the limit is read whole and forwarded.
    with connect(hasty.port) as sock:
        sock.sendall(request_head("POST", CHAT, {"Content-Type": "application/json"}, len(CHAT_BODY)) + CHAT_BODY[:10])
        sock.sendall(CHAT_BODY[10:])
        reply = read_reply(sock)
    assert reply.status == 200
    (seen,) = requests_seen(upstream, 1)
    assert seen.json()["messages"] == [{"role": "user", "content": "hi"}]


async def _flood(request: Recorded, responder: Responder) -> None:
    """An SSE stream of 64 KiB events, as fast as the relay takes them: 256 MiB at most."""
    await responder.start(200, [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")])
    event = b"data: " + b"x" * 65536 + b"\n\n"
    for _ in range(4096):
        if responder.closed.done():
            return
        await responder.chunk(event)


def _read_head_then_nothing(relay: RelayServer, upstream: UpstreamThread) -> None:
    """The client reads the head and then nothing, so the relay's send waits on a full socket: the relay
    must drop the upstream stream and the client's connection, though the client never reads again."""
    upstream.upstream.handler = _flood
    idle_fds = relay_open_fds(relay)
    with connect(relay.port) as sock:
        sock.sendall(post_bytes(STREAM_BODY))
        assert read_head(sock).status == 200
        assert upstream.wait_for(lambda u: u.disconnects >= 1, timeout=15), "the relay kept the stalled stream"
        # A close that waited for the client to drain its buffer would hold the connection for as long
        # as the client lives.
        deadline = time.monotonic() + 10
        while relay_open_fds(relay) > idle_fds and time.monotonic() < deadline:
            time.sleep(0.05)
        assert relay_open_fds(relay) <= idle_fds, "the relay still holds the stalled client's connection"
    upstream.upstream.handler = None


def test_client_that_stops_reading_is_given_up_and_frees_its_slot(
    relay_factory: Callable[..., RelayServer], upstream: UpstreamThread
) -> None:
    # After client_write_timeout the relay must let go, or the only slot (cap 1) and the upstream stream
    # stay taken.
    relay = relay_factory(client_write_timeout=1, max_concurrent_requests=1)
    _read_head_then_nothing(relay, upstream)
    assert post(relay).status == 200  # the slot is free again


def test_total_timeout_while_the_client_stopped_reading_drops_its_connection(
    relay_factory: Callable[..., RelayServer], upstream: UpstreamThread
) -> None:
    # total_timeout fires first here, while a send to the client waits: the same stuck client.
    _read_head_then_nothing(relay_factory(total_timeout=1, client_write_timeout=None), upstream)
