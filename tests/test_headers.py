"""What crosses the relay in each direction, seen over raw sockets so every header byte is the test's own:
end-to-end headers pass, hop-by-hop ones and the client's credentials do not, and status codes and
bodies come back unchanged, redirects included (passed on, never followed)."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import orjson
import pytest

from relay.testing import Recorded, Responder, UpstreamThread
from tests.clients import header_values, requests_seen
from tests.servers import API_KEY, MODEL, RelayServer

TIMEOUT = 10.0
MAX_LINE = 1 << 20
MAX_HEADERS = 200
MAX_CHUNKS = 100_000
CHAT = "/v1/chat/completions"
BODY = b'{"model": "client-model", "messages": [{"role": "user", "content": "hi"}]}'
# What a client talking to the upstream directly sends for BODY through the relay: the fake upstream echoes
# the model, so only this makes the two answers comparable byte for byte.
DIRECT_BODY = BODY.replace(b"client-model", MODEL.encode())
HeaderPairs = Sequence[tuple[str, str | bytes]]


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]  # lower-cased names, in order, latin-1 decoded
    body: bytes

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]


def _latin1(value: str | bytes) -> str:
    """Header bytes as the one-char-per-byte string that both the raw client and the fake upstream use."""
    return value.decode("latin-1") if isinstance(value, bytes) else value


def exchange(port: int, path: str = CHAT, headers: HeaderPairs = (), body: bytes = BODY) -> Reply:
    """One POST on a fresh connection, written byte for byte: Host and Content-Length are added only when
    the caller did not set them, nothing else is."""
    names = {name.lower() for name, _ in headers}
    given = [(name, _latin1(value)) for name, value in headers]
    if "content-length" not in names:
        given.insert(0, ("Content-Length", str(len(body))))
    if "host" not in names:
        given.insert(0, ("Host", f"127.0.0.1:{port}"))
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{name}: {value}\r\n" for name, value in given) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(head.encode("latin-1") + body)
        with sock.makefile("rb") as stream:
            return _read_reply(stream)


def _read_reply(stream: BinaryIO) -> Reply:
    status_line = stream.readline(MAX_LINE)
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    reply = Reply(int(status_line.split(b" ", 2)[1]), [], b"")
    for _ in range(MAX_HEADERS):
        line = stream.readline(MAX_LINE)
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        reply.headers.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))
    if any("chunked" in value.lower() for value in reply.values("transfer-encoding")):
        reply.body = _read_chunked(stream)
    elif lengths := reply.values("content-length"):
        reply.body = stream.read(int(lengths[0]))
    else:
        reply.body = stream.read()
    return reply


def _read_chunked(stream: BinaryIO) -> bytes:
    parts = []
    for _ in range(MAX_CHUNKS):
        size = int(stream.readline(MAX_LINE).split(b";")[0], 16)
        if size == 0:
            while stream.readline(MAX_LINE) not in (b"\r\n", b""):  # trailers
                pass
            return b"".join(parts)
        parts.append(stream.read(size))
        assert stream.read(2) == b"\r\n"
    raise AssertionError(f"more than {MAX_CHUNKS} chunks")


def answer_with(upstream: UpstreamThread, status: int, headers: HeaderPairs, body: bytes = b"") -> None:
    """Make the upstream answer the next requests with exactly this head (plus Content-Length) and body."""

    async def handler(request: Recorded, responder: Responder) -> None:
        lines = [(name, _latin1(value)) for name, value in headers]
        await responder.start(status, [*lines, ("Content-Length", str(len(body)))])
        await responder.write(body)

    upstream.upstream.handler = handler


# --- response headers ------------------------------------------------------------------------------

OPENAI_RESPONSE_HEADERS = (
    # The upstream's own Date and Server, which the relay's server must not duplicate.
    ("date", "Tue, 25 Nov 2025 00:00:00 GMT"),
    ("server", "cloudflare"),
    ("x-request-id", "req_7f3a9c0e1b2d4f6a8c0e1b2d4f6a8c0e"),
    ("openai-processing-ms", "1234"),
    ("openai-version", "2020-10-01"),
    ("x-ratelimit-limit-requests", "10000"),
    ("x-ratelimit-remaining-requests", "9998"),
    ("x-ratelimit-limit-tokens", "30000000"),
    ("x-ratelimit-remaining-tokens", "29999975"),
    ("x-ratelimit-reset-requests", "6ms"),
    ("x-ratelimit-reset-tokens", "0s"),
    ("retry-after", "3"),
    ("set-cookie", "__cf_bm=abc; path=/; HttpOnly"),
    ("x-multi", "first"),
    ("x-multi", "second"),
)


def test_upstream_response_headers_reach_the_client(relay: RelayServer, upstream: UpstreamThread) -> None:
    body = b'{"id": "chatcmpl-1"}'
    answer_with(upstream, 200, [("Content-Type", "application/json"), *OPENAI_RESPONSE_HEADERS], body)

    reply = exchange(relay.port)

    assert reply.status == 200
    assert reply.body == body
    for name in dict(OPENAI_RESPONSE_HEADERS):
        assert reply.values(name) == [value for key, value in OPENAI_RESPONSE_HEADERS if key == name], name


def _without_request_id(reply: Reply) -> list[tuple[str, str]]:
    return [(name, value) for name, value in reply.headers if name != "x-request-id"]


@pytest.mark.parametrize("status", ["200", "429"])
def test_default_upstream_headers_match_direct(relay: RelayServer, upstream: UpstreamThread, status: str) -> None:
    directives = [
        ("Content-Type", "application/json"),
        ("x-fake-status", status),
        ("x-fake-headers", '{"x-custom-resp": "v1", "retry-after": "7", "openai-organization": "org-up"}'),
    ]

    via_relay = exchange(relay.port, headers=directives)
    direct = exchange(upstream.port, headers=directives, body=DIRECT_BODY)

    assert via_relay.status == direct.status == int(status)
    assert via_relay.body == direct.body
    assert re.fullmatch(r"req_\d+", via_relay.values("x-request-id")[0])
    # Every header but the per-request id, in the upstream's order, nothing added or lost.
    assert _without_request_id(via_relay) == _without_request_id(direct)
    assert via_relay.values("x-custom-resp") == ["v1"]
    assert via_relay.values("retry-after") == ["7"]
    assert via_relay.values("x-ratelimit-remaining-requests") == ["9999"]


def test_hop_by_hop_response_headers_are_dropped(relay: RelayServer, upstream: UpstreamThread) -> None:
    body = b'{"ok": true}'
    answer_with(
        upstream,
        200,
        [
            ("Content-Type", "application/json"),
            ("Connection", "close, X-Hop"),
            ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Foo", "1"),
            ("Trailer", "x"),
            ("X-Kept", "yes"),
        ],
        body,
    )

    reply = exchange(relay.port)

    assert (reply.status, reply.body) == (200, body)
    assert reply.values("x-kept") == ["yes"]  # the filter is selective, not a wall
    for name in ("x-hop", "keep-alive", "proxy-foo", "trailer"):
        assert reply.values(name) == [], name


# --- request headers -------------------------------------------------------------------------------

END_TO_END = (
    ("X-Custom", "custom-value"),
    ("User-Agent", "OpenAI/Python 1.99.0 rollout-worker/3"),
    ("OpenAI-Beta", "assistants=v2"),
    ("X-Stainless-Retry-Count", "0"),
)


def test_end_to_end_request_headers_reach_upstream(relay: RelayServer, upstream: UpstreamThread) -> None:
    repeated = [("X-Multi", "first"), ("X-Multi", "second")]

    reply = exchange(relay.port, headers=[("Content-Type", "application/json"), *END_TO_END, *repeated])

    assert reply.status == 200
    [seen] = requests_seen(upstream, 1)
    for name, value in END_TO_END:
        assert header_values(seen, name.lower()) == [value], name
    assert header_values(seen, "x-multi") == ["first", "second"]


def test_non_ascii_request_header_bytes_reach_upstream_unchanged(relay: RelayServer, upstream: UpstreamThread) -> None:
    raw = "Caf\u00e9 \u2603".encode()  # UTF-8 on the wire, as clients send it

    reply = exchange(relay.port, headers=[("X-Title", raw)])

    assert reply.status == 200
    # The fake upstream decodes header bytes as latin-1, so equal strings mean equal bytes.
    assert header_values(requests_seen(upstream, 1)[0], "x-title") == [raw.decode("latin-1")]


def test_non_ascii_response_header_bytes_reach_client_unchanged(
    relay: RelayServer, upstream: UpstreamThread
) -> None:
    raw = "Caf\u00e9 \u2603".encode()
    answer_with(upstream, 200, [("Content-Type", "application/json"), ("X-Title", raw)], b"{}")

    reply = exchange(relay.port)

    assert reply.status == 200
    assert reply.values("x-title") == [raw.decode("latin-1")]


@pytest.mark.parametrize(
    ("sent", "dropped"),
    [
        ([("Authorization", "Bearer sk-client-key")], "authorization"),
        ([("Cookie", "session=client")], "cookie"),
        ([("OpenAI-Organization", "org-client")], "openai-organization"),
        ([("OpenAI-Project", "proj-client")], "openai-project"),
        ([("Proxy-Authorization", "Basic Y2xpZW50OnNlY3JldA==")], "proxy-authorization"),
        ([("Keep-Alive", "timeout=5, max=100")], "keep-alive"),
        ([("TE", "trailers")], "te"),
        ([("Trailer", "x-checksum")], "trailer"),
        ([("Proxy-Connection", "keep-alive")], "proxy-connection"),
        ([("Connection", "X-Drop"), ("X-Drop", "1")], "x-drop"),
        ([("Connection", "keep-alive, X-Drop"), ("X-Drop", "1")], "x-drop"),
    ],
    ids=[
        "authorization", "cookie", "openai-organization", "openai-project", "proxy-authorization", "keep-alive",
        "te", "trailer", "proxy-connection", "named-in-connection", "named-in-connection-with-keep-alive",
    ],
)
def test_client_header_is_not_forwarded(
    relay: RelayServer, upstream: UpstreamThread, sent: list[tuple[str, str]], dropped: str
) -> None:
    reply = exchange(relay.port, headers=[("X-Custom", "control"), *sent])

    assert reply.status == 200
    [seen] = requests_seen(upstream, 1)
    assert header_values(seen, "x-custom") == ["control"]  # the request did get through with its other headers
    if dropped == "authorization":
        assert header_values(seen, "authorization") == [f"Bearer {API_KEY}"]
    else:
        assert header_values(seen, dropped) == []
    others = [value.lower() for name, value in seen.headers if name != "x-custom"]
    assert not any("client" in value or "x-drop" in value for value in others)


def test_client_host_is_replaced_by_the_upstreams(relay: RelayServer, upstream: UpstreamThread) -> None:
    reply = exchange(relay.port, headers=[("Host", "localhost:4242")])

    assert reply.status == 200
    assert header_values(requests_seen(upstream, 1)[0], "host") == [f"127.0.0.1:{upstream.port}"]


@pytest.fixture
def relay_with_defaults(relay_factory: Callable[..., RelayServer]) -> RelayServer:
    return relay_factory(openai_default_headers={"OpenAI-Organization": "org-cfg", "X-Default": "d"})


def test_configured_default_headers_reach_upstream(relay_with_defaults: RelayServer, upstream: UpstreamThread) -> None:
    reply = exchange(relay_with_defaults.port)

    assert reply.status == 200
    [seen] = requests_seen(upstream, 1)
    assert header_values(seen, "openai-organization") == ["org-cfg"]
    assert header_values(seen, "x-default") == ["d"]
    assert header_values(seen, "authorization") == [f"Bearer {API_KEY}"]


def test_client_header_beats_default_but_not_for_organization(
    relay_with_defaults: RelayServer, upstream: UpstreamThread
) -> None:
    sent = [("X-Default", "from-client"), ("OpenAI-Organization", "org-client"), ("OpenAI-Project", "proj-client")]

    reply = exchange(relay_with_defaults.port, headers=sent)

    assert reply.status == 200
    [seen] = requests_seen(upstream, 1)
    assert header_values(seen, "x-default") == ["from-client"]
    assert header_values(seen, "openai-organization") == ["org-cfg"]
    assert header_values(seen, "openai-project") == []


# --- status codes and redirects --------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
def test_error_status_and_body_pass_through(relay: RelayServer, upstream: UpstreamThread, status: int) -> None:
    directives = [("Content-Type", "application/json"), ("x-fake-status", str(status))]

    via_relay = exchange(relay.port, headers=directives)
    direct = exchange(upstream.port, headers=directives, body=DIRECT_BODY)

    assert via_relay.status == direct.status == status
    assert via_relay.body == direct.body
    assert orjson.loads(via_relay.body)["error"]["message"] == f"Fake upstream error {status}"


@pytest.mark.parametrize(
    ("status", "content_type", "body"),
    [
        (201, "application/json", b'{"id": "created-1", "object": "thing"}'),
        (503, "text/html; charset=utf-8", b"<html><body><h1>503 Service Unavailable</h1>\n</body></html>\n"),
        (200, "application/octet-stream", bytes(range(256)) * 4),
    ],
    ids=["201-json", "503-html", "200-binary"],
)
def test_handler_status_and_body_pass_through(
    relay: RelayServer, upstream: UpstreamThread, status: int, content_type: str, body: bytes
) -> None:
    answer_with(upstream, status, [("Content-Type", content_type)], body)

    reply = exchange(relay.port)

    assert (reply.status, reply.body) == (status, body)
    assert reply.values("content-type") == [content_type]


@pytest.mark.parametrize("status", [302, 307, 308])
@pytest.mark.parametrize("target", ["refused", "upstream"])
def test_redirect_is_passed_on_not_followed(
    relay: RelayServer, upstream: UpstreamThread, status: int, target: str
) -> None:
    # Port 1 refuses, so following would end in a 502; the upstream itself would count a second request.
    location = "http://127.0.0.1:1/elsewhere" if target == "refused" else f"{upstream.base_url}/chat/completions"
    body = b'{"moved": true}'
    answer_with(upstream, status, [("Location", location), ("Content-Type", "application/json")], body)

    reply = exchange(relay.port)

    assert (reply.status, reply.body) == (status, body)
    assert reply.values("location") == [location]
    requests_seen(upstream, 1)
