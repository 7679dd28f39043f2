"""Graceful shutdown on SIGTERM: the relay stops accepting connections at once, lets streams in flight
finish for up to `shutdown_grace_seconds`, then cuts what is left (the client sees a truncated stream, the
upstream a closed connection) and exits.

Each test starts a relay of its own, since it ends it. The upstream's stream is a HeldStream, which sends
each event when the test says so: what happens after the signal cannot depend on timing.
"""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay.testing import UpstreamThread
from tests.clients import (
    STREAM_BODY,
    HeldStream,
    connect,
    post_bytes,
    read_body_until,
    read_head,
    read_to_end,
)
from tests.servers import RelayServer, start_relay

StartRelay = Callable[..., RelayServer]
EXIT_TIMEOUT = 15.0  # seconds; with a 1 s grace the relay has no reason to take anywhere near this long


@pytest.fixture
def own_relay(tmp_path: Path, upstream: UpstreamThread) -> Iterator[StartRelay]:
    """Start a relay for this test only; whatever the test leaves running is stopped afterwards."""
    started: list[RelayServer] = []

    def start(**overrides: object) -> RelayServer:
        server = start_relay(tmp_path / f"relay{len(started)}", upstream.base_url, **overrides)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def wait_until_refused(port: int, timeout: float = 5.0) -> None:
    """New connections are refused once the relay has closed its listening socket."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connect(port).close()
        except ConnectionRefusedError:
            return
        assert time.monotonic() < deadline, "the relay still accepts connections after SIGTERM"
        time.sleep(0.02)


def stream_then_sigterm(sock: socket.socket, server: RelayServer, held: HeldStream) -> http.client.HTTPResponse:
    """Open a stream through the relay, receive its first event, then send the relay SIGTERM."""
    sock.sendall(post_bytes(STREAM_BODY))
    held.let_out(1)
    response = read_head(sock)
    assert response.status == 200
    read_body_until(response, HeldStream.event(0))
    server.process.send_signal(signal.SIGTERM)
    return response


def exit_code(server: RelayServer) -> int:
    try:
        return server.process.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the relay did not exit within {EXIT_TIMEOUT} s of SIGTERM:\n{server.log()}") from None


def test_stream_in_flight_finishes_after_sigterm(own_relay: StartRelay, upstream: UpstreamThread) -> None:
    server = own_relay(shutdown_grace_seconds=10)
    held = HeldStream(events=3)
    upstream.upstream.handler = held
    try:
        with connect(server.port) as sock:
            response = stream_then_sigterm(sock, server, held)
            wait_until_refused(server.port)
            # Shutdown has begun and is waiting for this stream (uvicorn says so) while the stream is held.
            server.wait_for_log(r"Waiting for connections to close")
            # The stream outlives the listener: the rest of its events still come, then its clean end.
            held.finish()
            rest, complete = read_to_end(response)
        assert complete
        assert HeldStream.event(1) in rest and HeldStream.event(2) in rest
    finally:
        held.finish()
    assert upstream.upstream.disconnects == 0  # the relay read the upstream's stream to its end
    assert exit_code(server) == 0, server.log()


def test_stream_beyond_the_grace_period_is_cut(own_relay: StartRelay, upstream: UpstreamThread) -> None:
    server = own_relay(shutdown_grace_seconds=1)
    held = HeldStream(events=3)  # only the first event is ever let out
    upstream.upstream.handler = held
    try:
        with connect(server.port) as sock:
            response = stream_then_sigterm(sock, server, held)
            exit_code(server)  # a bounded wait: the grace period ends it, not the stream
            rest, complete = read_to_end(response)
        assert not complete, "a stream cut by shutdown ended as if complete"
        assert HeldStream.event(1) not in rest
        assert upstream.wait_for(lambda u: u.disconnects >= 1), "the upstream request was left open"
    finally:
        held.finish()
