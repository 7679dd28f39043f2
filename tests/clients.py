"""Client-side helpers shared by the test files: raw HTTP/1.1 on sockets (so a test controls every byte
and sees truncation as the standard library's IncompleteRead), what the fake upstream received, a scrape
of /metrics, and an upstream stream that the test steps event by event."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from relay.testing import Recorded, Responder, UpstreamThread
from tests.servers import MODEL, RelayServer

# Every socket operation is bounded: a relay that waits where it should answer fails the test, not CI.
TIMEOUT = 10.0
CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
CHAT_BODY = b'{"messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = b'{"messages":[{"role":"user","content":"hi"}],"stream":true}'
RESPONSES_BODY = b'{"input":"hi"}'


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def json(self) -> Any:
        return json.loads(self.body)


def request_head(
    method: str, target: str, headers: Mapping[str, str] | None = None, length: int | None = None
) -> bytes:
    """A request line and headers, exactly as given; Content-Length only when `length` is given."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def post_bytes(body: bytes, target: str = CHAT, headers: Mapping[str, str] | None = None) -> bytes:
    """A complete POST with a JSON content type (unless `headers` says otherwise)."""
    return request_head("POST", target, {"Content-Type": "application/json", **(headers or {})}, len(body)) + body


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def read_head(sock: socket.socket) -> http.client.HTTPResponse:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response


def read_to_end(response: http.client.HTTPResponse) -> tuple[bytes, bool]:
    """The body bytes received, and whether its framing (Content-Length or chunks) said it was complete.

    A socket timeout is not caught: a relay that leaves the client waiting fails the test."""
    try:
        return response.read(), True
    except http.client.IncompleteRead as exc:
        return exc.partial, False
    except ConnectionResetError:
        return b"", False


def read_reply(sock: socket.socket) -> Reply:
    """One complete reply from a connection on which a request was sent."""
    response = read_head(sock)
    body, complete = read_to_end(response)
    assert complete, f"reply {response.status} was truncated after {len(body)} bytes"
    return Reply(response.status, response.headers, body)


def exchange(port: int, raw: bytes) -> Reply:
    """Send raw bytes on a new connection and read one complete reply."""
    with connect(port) as sock:
        sock.sendall(raw)
        return read_reply(sock)


def post(server: RelayServer, body: bytes = CHAT_BODY, target: str = CHAT, headers: Mapping[str, str] | None = None) -> Reply:
    return exchange(server.port, post_bytes(body, target, headers))


def assert_chat_completion(reply: Reply) -> None:
    """A whole, successful, non-stream chat completion answered through the relay."""
    assert reply.status == 200, reply.body
    payload = reply.json()
    assert payload["object"] == "chat.completion"
    assert payload["model"] == MODEL


def requests_seen(upstream: UpstreamThread, count: int) -> list[Recorded]:
    """Exactly `count` requests reached the upstream in this test (a relay that retried, followed a
    redirect or answered by itself shows here); they are returned in arrival order."""
    seen = list(upstream.upstream.requests)
    assert len(seen) == count, [request.path for request in seen]
    return seen


def header_values(request: Recorded, name: str) -> list[str]:
    """Every value of a header, so a duplicate shows as well as an absence."""
    return [value for key, value in request.headers if key == name]


def get(server: RelayServer, target: str, headers: Mapping[str, str] | None = None) -> Reply:
    return exchange(server.port, request_head("GET", target, headers))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- /metrics ------------------------------------------------------------------------------------------


@dataclass
class Samples:
    """One scrape of /metrics: every sample by name and label set, as the Prometheus parser reads them."""

    values: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels; 0 when absent (a counter that was never incremented)."""
        return self.values.get((name, frozenset(labels.items())), 0.0)


def scrape(server: RelayServer, headers: Mapping[str, str] | None = None) -> Samples:
    reply = get(server, "/metrics", headers)
    assert reply.status == 200, reply.body[:300]
    assert (reply.header("content-type") or "").startswith("text/plain")
    values = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(reply.body.decode())
        for sample in family.samples
    }
    return Samples(values)


def scrape_until(server: RelayServer, condition: Callable[[Samples], bool], timeout: float = 5.0) -> Samples:
    """The first scrape that meets `condition`: a state the relay reaches a moment after the client acted."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        if condition(samples):
            return samples
        assert time.monotonic() < deadline, f"/metrics never showed the expected state: {samples.values}"
        time.sleep(0.02)


def idle(samples: Samples) -> bool:
    return samples.value("relay_upstream_in_flight") == 0 and samples.value("relay_slot_waiting") == 0


def scrape_when_idle(server: RelayServer, timeout: float = 5.0) -> Samples:
    """A scrape once no upstream request is in flight and none waits for a slot.

    The relay records a request just after its last byte went out, so the client may be a moment ahead of
    the metrics; a gauge that never returns to 0 fails here."""
    return scrape_until(server, idle, timeout)


# --- a stream the test steps ----------------------------------------------------------------------------


class HeldStream:
    """A custom upstream handler: a chunked SSE stream whose events go out only when the test lets them.

    `let_out(n)` releases the next n events; `finish()` releases the rest and the end of the stream. Every
    request it serves shares the same gates. A handler whose connection closes stops at once, so a held
    stream never outlives its test; one that waits longer than `timeout` aborts its connection."""

    def __init__(self, events: int = 3, timeout: float = 2 * TIMEOUT) -> None:
        self.events = events
        self.timeout = timeout
        self._gates = [threading.Event() for _ in range(events + 1)]  # the last one ends the stream
        self._released = 0

    @staticmethod
    def event(index: int) -> bytes:
        return b'data: {"held": %d}\n\n' % index

    def let_out(self, count: int = 1) -> None:
        for gate in self._gates[self._released : self._released + count]:
            gate.set()
        self._released = min(len(self._gates), self._released + count)

    def finish(self) -> None:
        self.let_out(len(self._gates))

    async def __call__(self, request: Recorded, responder: Responder) -> None:
        await responder.start(200, [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")])
        for index, gate in enumerate(self._gates):
            if not await _opened_before_close(responder, gate, self.timeout):
                if not responder.closed.done():
                    responder.abort()  # the test never let it go on: cut it rather than hang the relay
                return
            if index < self.events:
                await responder.chunk(self.event(index))
        await responder.end_chunks()


async def _opened_before_close(responder: Responder, gate: threading.Event, timeout: float) -> bool:
    """True once the test opens `gate`; False if the connection closes first or `timeout` passes."""
    opened = asyncio.ensure_future(responder.wait(gate, timeout))
    await asyncio.wait((opened, responder.closed), return_when=asyncio.FIRST_COMPLETED)
    if not opened.done():
        opened.cancel()
        return False
    return opened.result()


def read_body_until(response: http.client.HTTPResponse, marker: bytes, limit: int = 64 * 1024) -> bytes:
    """Body bytes as they arrive until `marker` is among them (each read is bounded by the socket timeout)."""
    received = b""
    while marker not in received:
        assert len(received) < limit, received[:300]
        data = response.read1(4096)
        assert data, f"the body ended before {marker!r}: {received[:300]!r}"
        received += data
    return received


# --- shared by the fault, abuse, load and security tests ---------------------------------------------

ERROR_KEYS = {"message", "type", "param", "code"}


def assert_openai_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    """An error the relay made itself: the status, OpenAI's shape with exactly the four keys, the code."""
    assert reply.status == status, reply.body[:500]
    assert reply.header("content-type") == "application/json"
    payload = reply.json()
    assert set(payload) == {"error"}
    error = payload["error"]
    assert set(error) == ERROR_KEYS
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    return error


def assert_closed_by_peer(sock: socket.socket) -> None:
    """The other end closed the connection: end of stream (or a reset), not more bytes, not a timeout."""
    try:
        assert sock.recv(1) == b""
    except ConnectionResetError:
        pass


def leave_and_wait_cancelled(sock: socket.socket, upstream: UpstreamThread, timeout: float = 5.0) -> None:
    """Close the client's connection and wait until the upstream sees its request cancelled."""
    sock.close()
    assert upstream.wait_for(lambda u: u.disconnects >= 1, timeout=timeout), "the upstream request was not cancelled"
