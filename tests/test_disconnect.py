"""A client that goes away cancels its upstream request: the upstream sees its connection closed, and the
concurrency slot is free again. The relay has a cap of 1, so a slot that leaked would make the next
request wait forever (here: fail on its socket timeout) instead of succeeding.

Three moments to leave: before the upstream's first byte, in the middle of an SSE stream, and in the
middle of a JSON body with a Content-Length.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import orjson
import pytest

from relay.testing import Recorded, Responder, UpstreamThread
from tests.clients import CHAT_BODY, STREAM_BODY, assert_chat_completion, connect, post, post_bytes, scrape_until, scrape_when_idle
from tests.servers import MODEL, PLAIN_UVICORN, RELAY_SERVE, RelayServer

STALL = "x-test-stall"  # asks the handler below for half a body and then silence
PARTIAL = b'{"object":"chat.completion","choices":[{"message":{"content":"'
FULL = orjson.dumps({"object": "chat.completion", "model": MODEL, "choices": []})


# Under relay serve the protocol reports the disconnect; under plain uvicorn a pending receive() does.
@pytest.fixture(scope="module", params=[RELAY_SERVE, PLAIN_UVICORN])
def single_slot_relay(relay_factory: Callable[..., RelayServer], request: pytest.FixtureRequest) -> RelayServer:
    return relay_factory(max_concurrent_requests=1, launcher=request.param)


def read_until(sock: socket.socket, marker: bytes, limit: int = 64 * 1024) -> bytes:
    """Read what the relay sends until `marker` shows up: proof that the exchange got that far."""
    received = b""
    deadline = time.monotonic() + 10
    while marker not in received:
        assert time.monotonic() < deadline and len(received) < limit, received[:300]
        data = sock.recv(4096)
        assert data, f"the relay closed the connection early: {received[:300]!r}"
        received += data
    return received


async def _half_json_then_wait(request: Recorded, responder: Responder) -> None:
    """With STALL: announce a whole JSON body, send its start, wait for the peer to go. Else answer."""
    if request.header(STALL) is None:
        await responder.start(200, [("content-type", "application/json"), ("content-length", str(len(FULL)))])
        await responder.write(FULL)
        return
    await responder.start(200, [("content-type", "application/json"), ("content-length", "4096")])
    await responder.write(PARTIAL)
    await responder.wait_closed(timeout=20)


def leave_and_check_slot_is_freed(sock: socket.socket, server: RelayServer, upstream: UpstreamThread) -> None:
    sock.close()
    assert upstream.wait_for(lambda u: u.disconnects >= 1, timeout=5), "the upstream request was not cancelled"
    # Cap 1: this request gets through only if the abandoned one gave its slot back.
    assert_chat_completion(post(server))
    assert "Traceback" not in server.log()  # a disconnect is routine, not an error


def test_disconnect_while_waiting_for_the_first_byte(single_slot_relay: RelayServer, upstream: UpstreamThread) -> None:
    sock = connect(single_slot_relay.port)
    sock.sendall(post_bytes(CHAT_BODY, headers={"x-fake-fault": "hang"}))
    # The relay holds the slot once the upstream has the request (and will never answer it).
    assert upstream.wait_for(lambda u: len(u.requests) == 1 and u.in_flight >= 1, timeout=5)
    leave_and_check_slot_is_freed(sock, single_slot_relay, upstream)


def test_disconnect_mid_stream(single_slot_relay: RelayServer, upstream: UpstreamThread) -> None:
    sock = connect(single_slot_relay.port)
    # The fake upstream sends half the events, then keeps the stream open without a word.
    sock.sendall(post_bytes(STREAM_BODY, headers={"x-fake-fault": "stall-mid-stream"}))
    read_until(sock, b"data: ")
    leave_and_check_slot_is_freed(sock, single_slot_relay, upstream)


def test_disconnect_mid_json_body(single_slot_relay: RelayServer, upstream: UpstreamThread) -> None:
    upstream.upstream.handler = _half_json_then_wait
    sock = connect(single_slot_relay.port)
    sock.sendall(post_bytes(CHAT_BODY, headers={STALL: "1"}))
    read_until(sock, PARTIAL)
    leave_and_check_slot_is_freed(sock, single_slot_relay, upstream)


def test_leaving_in_the_middle_of_the_request_body_is_recorded_as_499(
    single_slot_relay: RelayServer, upstream: UpstreamThread
) -> None:
    # The README promises 499 and client_gone for a client that left before any answer, whenever it left.
    before = scrape_when_idle(single_slot_relay)
    with connect(single_slot_relay.port) as sock:
        sock.sendall(post_bytes(b'{"messages": [' + b" " * 10_000 + b"]}")[:-5000])  # most of it, not all
        time.sleep(0.1)
    after = scrape_until(
        single_slot_relay,
        lambda samples: samples.value("relay_requests_total", endpoint="chat.completions", status="499")
        > before.value("relay_requests_total", endpoint="chat.completions", status="499"),
    )
    assert after.value("relay_requests_total", endpoint="chat.completions", status="0") == 0
    assert upstream.upstream.requests == []
    assert_chat_completion(post(single_slot_relay))  # and nothing is held
