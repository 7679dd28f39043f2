"""What crosses the relay in each direction, as data (relay.headers)."""

from __future__ import annotations

from relay.headers import client_response_headers, upstream_request_headers


def test_credentials_framing_and_hop_by_hop_never_go_upstream() -> None:
    sent = [
        (b"host", b"127.0.0.1:8000"),
        (b"authorization", b"Bearer client-key"),
        (b"cookie", b"session=1"),
        (b"openai-organization", b"org-client"),
        (b"content-length", b"12"),
        (b"content-type", b"application/json"),
        (b"content-encoding", b"gzip"),  # the relay forwards the body it patched: plain JSON
        (b"expect", b"100-continue"),
        (b"keep-alive", b"timeout=5"),
        (b"proxy-authorization", b"Basic x"),
        (b"x-request-tag", b"kept"),
        (b"accept", b"text/event-stream"),
    ]
    assert upstream_request_headers(sent) == [(b"x-request-tag", b"kept"), (b"accept", b"text/event-stream")]


def test_headers_named_by_connection_are_hop_by_hop_too() -> None:
    sent = [(b"connection", b"keep-alive, X-Trace"), (b"x-trace", b"1"), (b"x-other", b"2")]
    assert upstream_request_headers(sent) == [(b"x-other", b"2")]


def test_response_headers_keep_their_bytes_with_lower_case_names() -> None:
    received = [(b"X-Request-Id", b"req_1"), (b"Transfer-Encoding", b"chunked"), (b"X-Caf\xc3\xa9", b"\xe9")]
    assert client_response_headers(received) == [(b"x-request-id", b"req_1"), (b"x-caf\xc3\xa9", b"\xe9")]
