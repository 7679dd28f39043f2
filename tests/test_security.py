"""The relay holds the API key and listens where only this machine can reach it.

- The key appears in no log line, at debug level with the JSON access log on, whatever goes wrong (each
  failure below first proves that the log recorded it, so the check looks at a log that saw it; the
  warning lines quote aiohttp's exception text), and in no error body.
- The key goes only to openai_base_url's host: a client's Host header cannot send the request elsewhere.
- `relay serve` binds 127.0.0.1 when the config names no host.

Already covered elsewhere: repr(settings) (test_config), redirects (test_headers), the absolute-form
request target (test_errors), request bodies logged with the key redacted (test_logging).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.testing import Recorded, Responder, UpstreamThread
from tests.clients import (
    CHAT,
    CHAT_BODY,
    STREAM_BODY,
    Reply,
    assert_chat_completion,
    assert_openai_error,
    connect,
    exchange,
    header_values,
    post_bytes,
    read_head,
    read_to_end,
    request_head,
    requests_seen,
)
from tests.servers import API_KEY, RelayServer, start_relay

# The key, and its tail on its own: a log that printed the key cut short or masked in the middle still fails.
SECRETS = (API_KEY, API_KEY[-16:])


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        leaks = [line.replace(secret, "<THE KEY>") for line in text.splitlines() if secret in line]
        assert not leaks, f"the API key leaked (masked here): {leaks[:3]}"


# --- the key is never logged -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loud_relay(upstream: UpstreamThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayServer]:
    """As talkative as the relay gets, with short limits so every failure happens quickly."""
    server = start_relay(
        tmp_path_factory.mktemp("loud"),
        upstream.base_url,
        args=("--log-level", "debug"),
        access_log="json",
        read_timeout=1,
        request_body_timeout=1,
        max_request_bytes=1024,
    )
    yield server
    server.stop()


def send(server: RelayServer, raw: bytes) -> Reply | None:
    """Send raw bytes and read the reply, or None when the relay cut the body short (a mid-body failure)."""
    with connect(server.port) as sock:
        sock.sendall(raw)
        response = read_head(sock)
        body, complete = read_to_end(response)
        return Reply(response.status, response.headers, body) if complete else None


def leave_mid_stream(server: RelayServer, raw: bytes) -> Reply | None:
    """Start a stream that stalls halfway, read its first event, and leave."""
    with connect(server.port) as sock:
        sock.sendall(raw)
        assert read_head(sock).read(6) == b"data: "
    return None


async def malformed_status_line(request: Recorded, responder: Responder) -> None:
    await responder.write(b"HTTP/1.1 two hundred OK\r\n\r\n")


@dataclass(frozen=True)
class Failure:
    raw: bytes
    status: int | None  # None: the client sees a cut body, or leaves itself
    code: str | None
    logged: str  # what the relay's log says about it: its JSON access line, or its own warning
    quotes: str | None = None  # the aiohttp exception that warning must quote (so its text was checked too)
    handler: Callable[[Recorded, Responder], object] | None = None
    act: Callable[[RelayServer, bytes], Reply | None] = send


def with_fault(fault: str, body: bytes = CHAT_BODY) -> bytes:
    return post_bytes(body, headers={"x-fake-fault": fault})


STALLED_BODY = request_head("POST", CHAT, {"Content-Type": "application/json"}, 100) + CHAT_BODY[:10]
CUT = "failed mid-body on /v1/chat/completions"
FAILURES = {
    "invalid-json": Failure(post_bytes(b"{nope"), 400, "invalid_json", '"status":400'),
    "too-large": Failure(post_bytes(CHAT_BODY.ljust(2048)), 413, "request_too_large", '"status":413'),
    "wrong-type": Failure(
        post_bytes(CHAT_BODY, headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type", '"status":415'
    ),
    "stalled-body": Failure(STALLED_BODY, 408, "request_timeout", '"status":408'),
    "reset-before-headers": Failure(
        with_fault("reset-before-headers"), 502, "upstream_disconnected", "-> 502: the upstream closed",
        "ServerDisconnectedError",
    ),
    "malformed-response": Failure(
        post_bytes(CHAT_BODY), 502, "bad_upstream_response", "-> 502: the upstream's answer could not be read",
        "HttpProcessingError", handler=malformed_status_line,
    ),
    "silent-upstream": Failure(
        with_fault("hang"), 504, "upstream_timeout", "-> 504: the upstream sent nothing", "read_timeout"
    ),
    "reset-mid-body": Failure(with_fault("reset-mid-body"), None, None, CUT, "ContentLengthError"),
    "reset-mid-stream": Failure(with_fault("reset-mid-stream", STREAM_BODY), None, None, CUT, "TransferEncodingError"),
    "stall-mid-stream": Failure(with_fault("stall-mid-stream", STREAM_BODY), None, None, CUT, "read_timeout"),
    "client-leaves": Failure(
        with_fault("stall-mid-stream", STREAM_BODY), None, None, "client disconnected", act=leave_mid_stream
    ),
    "upstream-401": Failure(
        post_bytes(CHAT_BODY, headers={"x-fake-status": "401"}), 401, None, '"upstream_status":401'
    ),
}


@pytest.mark.parametrize("name", sorted(FAILURES))
def test_api_key_is_in_no_log_line_and_no_error_body(
    loud_relay: RelayServer, upstream: UpstreamThread, name: str
) -> None:
    failure = FAILURES[name]
    upstream.upstream.handler = failure.handler
    already = loud_relay.log().count(failure.logged)
    reply = failure.act(loud_relay, failure.raw)
    if failure.status is None:
        assert reply is None, "the relay finished a body that it should have cut short"
    else:
        assert reply is not None and reply.status == failure.status, reply
        if failure.code is not None:
            assert_openai_error(reply, failure.status, failure.code)
        assert_no_secret(reply.body.decode("utf-8", "replace"))
    # The relay logs once it is done with the request, so wait for its line.
    lines = loud_relay.wait_for_log(rf"^.*{re.escape(failure.logged)}.*$", count=already + 1)
    assert_no_secret(loud_relay.log())
    if failure.quotes is not None:
        assert failure.quotes in lines[-1].group(0)


# --- the key goes only to the configured upstream ------------------------------------------------------


@pytest.fixture
def decoy() -> Iterator[socket.socket]:
    """A listening socket that nobody should connect to: where a Host header would send the request."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        yield sock


def test_client_host_header_does_not_choose_where_the_key_goes(
    relay: RelayServer, upstream: UpstreamThread, decoy: socket.socket
) -> None:
    elsewhere = f"127.0.0.1:{decoy.getsockname()[1]}"
    headers = {"Host": elsewhere, "X-Forwarded-Host": elsewhere, "Forwarded": f"host={elsewhere}"}
    raw = request_head("POST", CHAT, {"Content-Type": "application/json", **headers}, len(CHAT_BODY)) + CHAT_BODY
    # request_head writes its own Host first; a second Host is invalid HTTP, so send exactly one: ours.
    raw = raw.replace(b"Host: 127.0.0.1\r\n", b"", 1)
    reply = exchange(relay.port, raw)
    assert_chat_completion(reply)
    (seen,) = requests_seen(upstream, 1)
    assert header_values(seen, "host") == [f"127.0.0.1:{upstream.port}"]
    assert header_values(seen, "authorization") == [f"Bearer {API_KEY}"]
    with pytest.raises(BlockingIOError):  # nothing connected to the decoy, not even without a request
        decoy.accept()


# --- the default bind address ---------------------------------------------------------------------------


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on `port`, from /proc/net/tcp and tcp6 (hex, as the
    kernel writes them: 0100007F is 127.0.0.1)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


def test_serve_binds_loopback_when_the_config_names_no_host(upstream: UpstreamThread, tmp_path: Path) -> None:
    try:  # its config has no `host` key, and no --host is given
        server = start_relay(tmp_path, upstream.base_url)
    except RuntimeError as exc:  # start_relay looks for the 127.0.0.1 listening line
        pytest.fail(f"the relay did not say it listens on 127.0.0.1: {exc}")
    try:
        assert "host" not in (tmp_path / "relay.yaml").read_text()
        assert f"Uvicorn running on http://127.0.0.1:{server.port}" in server.log()
        assert listening_addresses(server.port) == {"0100007F"}
    finally:
        server.stop()
