"""Every error the relay makes itself, over real sockets: the status, OpenAI's error shape with all four
keys, the `code`, and that the upstream was never contacted where it must not be. Also: an upstream that
fails mid-body makes the relay abort the client's connection (the client can tell the body is
truncated), upstream errors pass through unchanged, and the API key is in no error body and no log.

Requests are written by hand on raw sockets, so the tests control every byte (odd request-targets, a
Content-Length that the body never reaches, unterminated chunked bodies) and read the reply with the
standard library's HTTP/1.1 parser, which reports a truncated body as IncompleteRead.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.testing import UpstreamThread
from tests.clients import Reply, exchange, post, post_bytes, request_head, connect, read_head, read_reply, read_to_end, CHAT, RESPONSES, CHAT_BODY, STREAM_BODY, assert_chat_completion
from tests.servers import API_KEY, RelayServer, free_port, start_relay

ERROR_KEYS = {"message", "type", "param", "code"}
LIMIT = 1024  # max_request_bytes of the relay that tests 413

RelayFactory = Callable[..., RelayServer]


# --- helpers for this file ---------------------------------------------------------------------------


def assert_relay_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    """The relay's own error: the status, OpenAI's shape with exactly the four keys, the code, no key."""
    assert reply.status == status, reply.body
    assert reply.header("content-type") == "application/json"
    payload = reply.json()
    assert set(payload) == {"error"}
    error = payload["error"]
    assert set(error) == ERROR_KEYS
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert API_KEY not in reply.body.decode("utf-8", "replace")
    return error


def assert_upstream_untouched(upstream: UpstreamThread) -> None:
    # The relay answers before it would forward, so anything forwarded has arrived by now.
    assert [request.path for request in upstream.upstream.requests] == []


def assert_logged_without_key(server: RelayServer, expected: str) -> None:
    """The relay logged this failure (so the check below looks at a log that saw it), but not the key."""
    log = server.log()
    assert expected in log, log
    assert API_KEY not in log


def assert_connection_closed(sock: socket.socket) -> None:
    """The relay closed the connection: end of stream (or a reset), not more bytes and not a timeout."""
    try:
        assert sock.recv(1) == b""
    except ConnectionResetError:
        pass


def padded_body(size: int) -> bytes:
    """A valid chat request of exactly `size` bytes."""
    head, tail = b'{"messages":[{"role":"user","content":"', b'"}]}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


@pytest.fixture(autouse=True)
def _key_never_logged(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, the relays it used have not logged the API key (tests that start their own relay
    with relay_factory check its log themselves, together with the line their failure must produce)."""
    yield
    for name in ("relay", "small_relay", "impatient_relay"):
        if name in request.fixturenames:
            assert API_KEY not in request.getfixturevalue(name).log()


# --- 400 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "target"),
    [
        (b"{nope", CHAT),
        (b"[1, 2]", CHAT),
        (b'"text"', CHAT),
        (b"3", CHAT),
        (b"", CHAT),
        (b"null", CHAT),
        (b"[{}]", RESPONSES),
    ],
    ids=["invalid-json", "array", "string", "number", "empty", "null", "responses-array"],
)
def test_body_that_is_not_a_json_object_is_400(
    relay: RelayServer, upstream: UpstreamThread, body: bytes, target: str
) -> None:
    assert_relay_error(post(relay, body, target), 400, "invalid_json")
    assert_upstream_untouched(upstream)


# --- 404 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target"),
    [("POST", "/v1/embeddings"), ("POST", "/v1/chat/completions/"), ("GET", "/v2/models"), ("POST", "/admin")],
)
def test_unknown_path_is_404(relay: RelayServer, upstream: UpstreamThread, method: str, target: str) -> None:
    raw = post_bytes(CHAT_BODY, target) if method == "POST" else request_head(method, target)
    assert_relay_error(exchange(relay.port, raw), 404, "unknown_url")
    assert_upstream_untouched(upstream)


@pytest.mark.parametrize(
    "target",
    ["/v1/../admin", "//evil.example/v1/chat/completions", "/v1/chat/completions/../../admin"],
    ids=["dot-dot", "scheme-relative", "dot-dot-after-api-path"],
)
def test_odd_request_targets_are_refused_and_never_reach_the_upstream(
    relay: RelayServer, upstream: UpstreamThread, target: str
) -> None:
    # A valid chat body, so that a relay which routed the target to the API would forward it.
    reply = exchange(relay.port, post_bytes(CHAT_BODY, target))
    assert 400 <= reply.status < 500, (reply.status, reply.body[:200])
    assert_upstream_untouched(upstream)


def test_absolute_form_target_goes_only_to_the_configured_upstream(relay: RelayServer, upstream: UpstreamThread) -> None:
    # RFC 9112 §3.2.2: a server must accept the absolute form; uvicorn keeps only its path. The relay
    # takes nothing from the client's authority: the request goes to the configured upstream or nowhere.
    target = f"http://127.0.0.1:{relay.port}/v1/chat/completions"
    reply = exchange(relay.port, post_bytes(CHAT_BODY, target).replace(b"Host: 127.0.0.1\r\n", f"Host: 127.0.0.1:{relay.port}\r\n".encode()))
    assert reply.status == 200
    (seen,) = upstream.upstream.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.header("host") == f"127.0.0.1:{upstream.port}"


def test_absolute_form_naming_another_host_than_host_is_refused(relay: RelayServer, upstream: UpstreamThread) -> None:
    # Host: 127.0.0.1 passes the allow-list, but the target's authority says where the request was meant to go.
    for target in ("http://evil.example/v1/chat/completions", f"http://127.0.0.1:{relay.port + 1}/v1/chat/completions"):
        reply = exchange(relay.port, post_bytes(CHAT_BODY, target))
        assert_relay_error(reply, 400, "invalid_host")
        assert reply.header("connection") == "close"
    assert upstream.upstream.requests == []


# --- Upgrade ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "upgrade", ["h2c", "websocket"], ids=["h2c-as-curl-http2-sends", "websocket"]
)
def test_upgrade_request_is_400_and_its_body_never_becomes_a_request(
    relay: RelayServer, upstream: UpstreamThread, upgrade: str
) -> None:
    # httptools passes what follows an Upgrade head to the new protocol; uvicorn would drop the body, or
    # parse a body that looks like a request as one: this one would reach the upstream, key and all.
    smuggled = post_bytes(CHAT_BODY)
    headers = {"Content-Type": "application/json", "Connection": "Upgrade", "Upgrade": upgrade}
    with connect(relay.port) as sock:
        sock.sendall(request_head("POST", CHAT, headers, len(smuggled)))
        sock.sendall(smuggled)
        reply = read_reply(sock)
        assert_relay_error(reply, 400, "upgrade_not_supported")
        assert_connection_closed(sock)
    assert_upstream_untouched(upstream)


# --- 405 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [CHAT, RESPONSES])
def test_get_on_an_api_path_is_405_with_allow(relay: RelayServer, upstream: UpstreamThread, target: str) -> None:
    reply = exchange(relay.port, request_head("GET", target))
    assert_relay_error(reply, 405, "method_not_allowed")
    assert reply.header("allow") == "POST"
    assert_upstream_untouched(upstream)


# --- 413 ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_relay(relay_factory: RelayFactory) -> RelayServer:
    return relay_factory(max_request_bytes=LIMIT)


def test_announced_oversized_body_is_413_without_reading_it(small_relay: RelayServer, upstream: UpstreamThread) -> None:
    announced = 10 * 1024 * 1024
    with connect(small_relay.port) as sock:
        # Only the head and a few bytes of the 10 MiB: a relay that waited for the body would time out here.
        sock.sendall(request_head("POST", CHAT, {"Content-Type": "application/json"}, announced) + CHAT_BODY[:20])
        response = read_head(sock)
        body, complete = read_to_end(response)
        assert complete
        assert_relay_error(Reply(response.status, response.headers, body), 413, "request_too_large")
        assert (response.getheader("connection") or "").lower() == "close"
        assert_connection_closed(sock)
    assert_upstream_untouched(upstream)


def test_chunked_body_growing_over_the_limit_is_413(small_relay: RelayServer, upstream: UpstreamThread) -> None:
    with connect(small_relay.port) as sock:
        head = request_head("POST", CHAT, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        chunk = b"x" * 400
        # Three chunks pass the limit; the terminating chunk never comes, so only the size can end it.
        sock.sendall(head + b"".join(b"%x\r\n%b\r\n" % (len(chunk), chunk) for _ in range(3)))
        response = read_head(sock)
        body, complete = read_to_end(response)
        assert complete
        assert_relay_error(Reply(response.status, response.headers, body), 413, "request_too_large")
        assert_connection_closed(sock)
    assert_upstream_untouched(upstream)


@pytest.mark.parametrize(("size", "status"), [(LIMIT, 200), (LIMIT + 1, 413)])
def test_limit_is_inclusive(small_relay: RelayServer, upstream: UpstreamThread, size: int, status: int) -> None:
    # The boundary, both ways: a body of exactly max_request_bytes is relayed, one byte more is not.
    reply = post(small_relay, padded_body(size))
    if status == 200:
        assert_chat_completion(reply)
        assert len(upstream.upstream.requests) == 1
    else:
        assert_relay_error(reply, 413, "request_too_large")
        assert_upstream_untouched(upstream)


# --- 415 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_non_json_content_type_is_415(relay: RelayServer, upstream: UpstreamThread, content_type: str) -> None:
    reply = post(relay, CHAT_BODY, headers={"Content-Type": content_type})
    assert_relay_error(reply, 415, "unsupported_media_type")
    assert_upstream_untouched(upstream)


def test_json_content_type_with_parameters_is_accepted(relay: RelayServer) -> None:
    # The other side of 415: only the media type counts, not its parameters or case.
    assert_chat_completion(post(relay, CHAT_BODY, headers={"Content-Type": "Application/JSON; charset=utf-8"}))


# --- 502 / 504: the upstream fails before its response ---------------------------------------------


def test_refused_upstream_is_502(relay_factory: RelayFactory) -> None:
    # A port that was free a moment ago and that nobody listens on: the connection is refused.
    server = relay_factory(upstream_url=f"http://127.0.0.1:{free_port()}/v1")
    error = assert_relay_error(post(server), 502, "upstream_unreachable")
    assert error["type"] == "upstream_error"
    assert_logged_without_key(server, "-> 502")


def test_upstream_reset_before_headers_is_502(upstream: UpstreamThread, tmp_path: Path) -> None:
    # A relay of its own, so the request goes out on a new connection: a POST that may have reached the
    # upstream is not sent again (only the keep-alive race on a reused connection is; see test_keepalive_race).
    server = start_relay(tmp_path, upstream.base_url)
    try:
        reply = post(server, headers={"x-fake-fault": "reset-before-headers"})
        assert_relay_error(reply, 502, "upstream_disconnected")
        assert len(upstream.upstream.requests) == 1
        assert_logged_without_key(server, "-> 502")
    finally:
        server.stop()


@pytest.fixture(scope="module")
def impatient_relay(relay_factory: RelayFactory) -> RelayServer:
    return relay_factory(read_timeout=1)


def test_silent_upstream_is_504(impatient_relay: RelayServer, upstream: UpstreamThread) -> None:
    reply = post(impatient_relay, headers={"x-fake-fault": "hang"})
    assert_relay_error(reply, 504, "upstream_timeout")
    assert len(upstream.upstream.requests) == 1
    assert_logged_without_key(impatient_relay, "-> 504")


# --- the upstream fails in the middle of a body -------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "body", "impatient"),
    [
        ("reset-mid-body", CHAT_BODY, False),  # JSON with a Content-Length
        ("reset-mid-stream", STREAM_BODY, False),  # SSE, chunked
        ("stall-mid-stream", STREAM_BODY, True),  # SSE, then silence beyond read_timeout
    ],
    ids=["reset-mid-body", "reset-mid-stream", "stall-mid-stream"],
)
def test_upstream_failure_mid_body_aborts_the_client_connection(
    relay_factory: RelayFactory, upstream: UpstreamThread, fault: str, body: bytes, impatient: bool
) -> None:
    server = relay_factory(read_timeout=1) if impatient else relay_factory()
    with connect(server.port) as sock:
        sock.sendall(post_bytes(body, headers={"x-fake-fault": fault}))
        response = read_head(sock)
        assert response.status == 200  # the upstream's status went out before it failed
        received, complete = read_to_end(response)
    # The client can tell: the body ends before its Content-Length, or the chunks never terminate.
    assert not complete, f"a partial body of {len(received)} bytes was relayed as if complete"
    assert_logged_without_key(server, "failed mid-body")
    # The relay itself is fine: the next request, on a new connection, gets a whole answer.
    assert_chat_completion(post(server))


# --- upstream errors pass through -----------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 500, 503])
def test_upstream_errors_pass_through_unchanged(relay: RelayServer, upstream: UpstreamThread, status: int) -> None:
    directives = {"x-fake-status": str(status), "x-fake-headers": '{"retry-after": "7"}'}
    direct = exchange(upstream.port, post_bytes(CHAT_BODY, "/v1/chat/completions", directives))
    relayed = post(relay, headers=directives)
    assert direct.status == relayed.status == status
    assert relayed.body == direct.body
    for name in ("retry-after", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "content-type"):
        assert relayed.header(name) == direct.header(name) is not None, name
