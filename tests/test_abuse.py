"""Clients that misbehave: one that reads a huge stream slowly must cost the relay bounded memory (the
upstream is held back instead: backpressure, not buffering); one that trickles its body (slowloris) is
cut off with 408 after request_body_timeout; one that trickles its request line and headers, or sends
nothing at all, is cut off with 408 after request_head_timeout; endless headers get 431.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from relay.testing import Recorded, Responder, UpstreamThread
from tests.clients import (
    CHAT_BODY,
    CHAT,
    STREAM_BODY,
    TIMEOUT,
    Reply,
    assert_chat_completion,
    assert_closed_by_peer,
    assert_openai_error,
    post,
    post_bytes,
    read_head,
    read_to_end,
    request_head,
)
from tests.servers import RelayServer, relay_rss

MiB = 1024 * 1024


# --- a slow reader of a big stream ---------------------------------------------------------------------

# More than the kernel can hold between the upstream and the client: loopback sockets autotune their
# buffers up to net.ipv4.tcp_rmem / tcp_wmem (32 MiB and 4 MiB here), so a few tens of MiB may sit there.
STREAM_TOTAL = 256 * MiB
EVENT = b"data: " + b"x" * (64 * 1024 - 8) + b"\n\n"
FRAMED_EVENT = b"%x\r\n%b\r\n" % (len(EVENT), EVENT)
SLOW_READ = 64 * 1024  # bytes per read, then a pause: at most ~1.3 MiB/s
SLOW_PAUSE = 0.05
SLOW_FOR = 2.5  # seconds of slow reading
RSS_GROWTH_LIMIT = 40 * MiB


@dataclass
class Firehose:
    """An SSE stream of STREAM_TOTAL bytes, written as fast as the connection takes it; `written` counts
    what the socket accepted (Responder.write waits while the socket is backed up)."""

    written: int = 0
    finished: bool = False

    async def __call__(self, request: Recorded, responder: Responder) -> None:
        await responder.start(200, [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")])
        while self.written < STREAM_TOTAL and not responder.closed.done():
            await responder.write(FRAMED_EVENT)
            self.written += len(FRAMED_EVENT)
        await responder.end_chunks()
        self.finished = not responder.closed.done()


def slow_client_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small, fixed receive window (set before connecting), like a client on a slow link.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_READ)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    return sock


def test_slow_reader_of_a_huge_stream_holds_the_upstream_back(relay: RelayServer, upstream: UpstreamThread) -> None:
    assert_chat_completion(post(relay))  # warm: the baseline includes an upstream connection and its buffers
    baseline = peak = relay_rss(relay)
    firehose = Firehose()
    upstream.upstream.handler = firehose
    received = 0
    with slow_client_socket(relay.port) as sock:
        sock.sendall(post_bytes(STREAM_BODY))
        deadline = time.monotonic() + SLOW_FOR
        while time.monotonic() < deadline:
            data = sock.recv(SLOW_READ)
            assert data, "the relay ended the stream early"
            received += len(data)
            time.sleep(SLOW_PAUSE)
            peak = max(peak, relay_rss(relay))
        held_back_at = firehose.written
    # A relay that buffered would have taken the whole stream from the upstream in a fraction of a second,
    # and grown by as much. Only the kernel's socket buffers on both hops may hold what the client has not read.
    assert held_back_at < STREAM_TOTAL // 4, f"the upstream wrote {held_back_at / MiB:.1f} MiB to a slow client's relay"
    assert not firehose.finished
    assert received < held_back_at
    assert peak - baseline < RSS_GROWTH_LIMIT, f"relay RSS grew {(peak - baseline) / MiB:.1f} MiB"
    # The client left: the upstream stream is cancelled, and the relay serves the next request.
    assert upstream.wait_for(lambda u: u.disconnects >= 1, timeout=5), "the upstream stream outlived its client"
    upstream.upstream.handler = None
    assert_chat_completion(post(relay))


# --- slowloris: a body trickled byte by byte ------------------------------------------------------------

BODY_TIMEOUT = 1  # request_body_timeout, seconds
ANNOUNCED = 100  # Content-Length; the body would take 30 s at one byte every 0.3 s
TRICKLE_PAUSE = 0.3
TRICKLE_AT_MOST = 30  # bytes (9 s): well past the timeout, yet short of the announced body


@pytest.fixture(scope="module")
def body_timeout_relay(relay_factory: Callable[..., RelayServer]) -> RelayServer:
    return relay_factory(request_body_timeout=BODY_TIMEOUT)


def trickle_until_answered(sock: socket.socket, data: bytes) -> int:
    """Send one byte per pause until the relay answers (then stop, so no byte meets a closed socket)."""
    sent = 0
    while sent < TRICKLE_AT_MOST and not select.select([sock], [], [], TRICKLE_PAUSE)[0]:
        if sent < len(data):
            sock.sendall(data[sent : sent + 1])
        sent += 1
    assert sent < TRICKLE_AT_MOST, f"no answer after trickling {sent} bytes over {sent * TRICKLE_PAUSE:.0f} s"
    return sent


def assert_refused_and_closed(sock: socket.socket, status: int, code: str) -> dict[str, Any]:
    response = read_head(sock)
    content, complete = read_to_end(response)
    assert complete
    error = assert_openai_error(Reply(response.status, response.headers, content), status, code)
    assert (response.getheader("connection") or "").lower() == "close"
    assert_closed_by_peer(sock)
    return error


@pytest.fixture(scope="module")
def head_guard_relay(relay_factory: Callable[..., RelayServer]) -> RelayServer:
    return relay_factory(request_head_timeout=BODY_TIMEOUT, max_header_bytes=4096)


@pytest.mark.parametrize(
    "head",
    [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"x" * 200],
    ids=["silent-connection", "trickled-headers"],
)
def test_trickled_or_missing_head_is_cut_off_with_408(
    head_guard_relay: RelayServer, upstream: UpstreamThread, head: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", head_guard_relay.port), timeout=TIMEOUT) as sock:
        trickle_until_answered(sock, head)
        error = assert_refused_and_closed(sock, 408, "request_timeout")
        assert "request_head_timeout" in error["message"]
    assert upstream.upstream.requests == []
    assert_chat_completion(post(head_guard_relay))  # a client with a whole head in time is served


def test_endless_headers_are_refused_with_431(head_guard_relay: RelayServer, upstream: UpstreamThread) -> None:
    headers = {f"X-Filler-{i}": "y" * 100 for i in range(60)}  # about 7 KiB, over the 4 KiB cap
    with socket.create_connection(("127.0.0.1", head_guard_relay.port), timeout=TIMEOUT) as sock:
        sock.sendall(post_bytes(CHAT_BODY, headers=headers))
        assert_refused_and_closed(sock, 431, "headers_too_large")
    assert upstream.upstream.requests == []


def test_a_header_that_never_ends_is_refused_with_431(head_guard_relay: RelayServer, upstream: UpstreamThread) -> None:
    # httptools hands a header to uvicorn only once it ends; this one never does, yet grows in memory.
    with socket.create_connection(("127.0.0.1", head_guard_relay.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ")
        for _ in range(64):  # 4 MiB at most, in 64 KiB pieces; the cap is 4 KiB
            if select.select([sock], [], [], 0.05)[0]:
                break
            sock.sendall(b"y" * 65536)
        assert_refused_and_closed(sock, 431, "headers_too_large")
    assert upstream.upstream.requests == []


def test_trickled_body_is_cut_off_with_408_and_closed(
    body_timeout_relay: RelayServer, upstream: UpstreamThread
) -> None:
    body = CHAT_BODY.ljust(ANNOUNCED)  # valid JSON (trailing spaces), so only the pace is wrong
    with socket.create_connection(("127.0.0.1", body_timeout_relay.port), timeout=TIMEOUT) as sock:
        sock.sendall(request_head("POST", CHAT, {"Content-Type": "application/json"}, ANNOUNCED))
        trickle_until_answered(sock, body)
        error = assert_refused_and_closed(sock, 408, "request_timeout")
        assert str(BODY_TIMEOUT) in error["message"]
    assert upstream.upstream.requests == []  # a partial body is never forwarded
    assert_chat_completion(post(body_timeout_relay))  # the relay itself is fine
