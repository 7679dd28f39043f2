"""The keep-alive race: the upstream closes a pooled connection just as the relay sends the next request on
it, so the upstream never reads it and the relay sees the connection end with no byte of an answer. The
relay sends such a request again, once, on a new connection, as browsers do (`retry_stale_connections`, on
by default); never for a new connection, never after a byte of the answer, never a second time.

The fake upstream makes the race deterministic (`x-fake-fault: close-when-reused`: answer, keep the
connection, close it unread when the next request arrives on it) and real (`x-fake-idle-close-ms`: close
a kept-alive connection once idle that long, racing the relay's next request).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.testing import UpstreamThread
from tests.clients import (
    CHAT_BODY,
    RESPONSES,
    STREAM_BODY,
    Reply,
    assert_chat_completion,
    assert_openai_error,
    connect,
    post,
    post_bytes,
    read_head,
    read_to_end,
    scrape_when_idle,
)
from tests.servers import RelayServer, start_relay

RESPONSES_STREAM = b'{"input":"hi","stream":true}'
REUSED_CLOSES = {"x-fake-fault": "close-when-reused"}
ROUNDS = 12


@pytest.fixture
def relay_of_its_own(upstream: UpstreamThread, tmp_path: Path) -> Iterator[RelayServer]:
    """Its pool holds only what this test put there. One slot: a resend that took a second one would hang."""
    server = start_relay(tmp_path, upstream.base_url, max_concurrent_requests=1, access_log="plain")
    yield server
    server.stop()


def assert_whole_stream(reply: Reply, last_event: bytes) -> None:
    """A complete SSE body whose last event begins with `last_event`."""
    assert reply.status == 200, reply.body[:300]
    assert reply.header("content-type") == "text/event-stream"
    assert reply.body.endswith(b"\n\n")
    assert reply.body.rstrip().rsplit(b"\n\n", 1)[-1].startswith(last_event)


@pytest.mark.parametrize(
    ("body", "target", "check"),
    [
        (CHAT_BODY, "/v1/chat/completions", assert_chat_completion),
        (STREAM_BODY, "/v1/chat/completions", lambda reply: assert_whole_stream(reply, b"data: [DONE]")),
        (RESPONSES_STREAM, RESPONSES, lambda reply: assert_whole_stream(reply, b"event: response.completed")),
    ],
    ids=["chat", "chat-stream", "responses-stream"],
)
def test_a_request_that_crosses_the_close_of_a_reused_connection_goes_again_once(
    relay_of_its_own: RelayServer, upstream: UpstreamThread, body: bytes, target: str, check: object
) -> None:
    relay = relay_of_its_own
    before = scrape_when_idle(relay).value("relay_retries_total", reason="stale_connection")
    check(post(relay, body, target, REUSED_CLOSES))  # type: ignore[operator]
    reply = post(relay, body, target)  # on the pooled connection, which the upstream closes unread
    check(reply)  # type: ignore[operator]
    assert upstream.upstream.unread_closes == 1  # the request did go out on the reused connection first
    assert len(upstream.upstream.requests) == 2  # and once more on a new one, where it was answered
    after = scrape_when_idle(relay)
    assert after.value("relay_retries_total", reason="stale_connection") - before == 1
    assert after.value("relay_upstream_errors_total", kind="reset") >= 1  # counted as it happened
    relay.wait_for_log(r"^method=POST .*status=200 .*attempts=2", count=1)


def test_with_the_switch_off_the_race_is_a_502(upstream: UpstreamThread, tmp_path: Path) -> None:
    relay = start_relay(tmp_path, upstream.base_url, retry_stale_connections=False)
    try:
        assert_chat_completion(post(relay, headers=REUSED_CLOSES))
        error = assert_openai_error(post(relay), 502, "upstream_disconnected")
        assert error["type"] == "upstream_error"
        assert upstream.upstream.unread_closes == 1 and len(upstream.upstream.requests) == 1
        assert_chat_completion(post(relay))  # the dead connection is gone from the pool
    finally:
        relay.stop()


def test_a_new_connection_that_ends_the_same_way_is_a_502_and_not_sent_again(
    relay_of_its_own: RelayServer, upstream: UpstreamThread
) -> None:
    # The first request of a fresh relay goes out on a new connection, which the upstream reads and drops.
    assert_openai_error(post(relay_of_its_own, headers={"x-fake-fault": "reset-before-headers"}), 502, "upstream_disconnected")
    assert len(upstream.upstream.requests) == 1


def test_the_resend_is_never_resent(relay_of_its_own: RelayServer, upstream: UpstreamThread) -> None:
    assert_chat_completion(post(relay_of_its_own, headers=REUSED_CLOSES))
    # Closed unread on the reused connection, then dropped without an answer on the new one.
    reply = post(relay_of_its_own, headers={"x-fake-fault": "reset-before-headers"})
    assert_openai_error(reply, 502, "upstream_disconnected")
    assert upstream.upstream.unread_closes == 1
    assert len(upstream.upstream.requests) == 2  # the first answer's request, and the one resend
    relay_of_its_own.wait_for_log(r"^method=POST .*status=502 .*attempts=2", count=1)


def test_no_resend_once_a_byte_of_the_answer_arrived(relay_of_its_own: RelayServer, upstream: UpstreamThread) -> None:
    assert_chat_completion(post(relay_of_its_own))  # a pooled connection for the next request
    with connect(relay_of_its_own.port) as sock:
        sock.sendall(post_bytes(CHAT_BODY, headers={"x-fake-fault": "reset-mid-body"}))
        response = read_head(sock)
        body, complete = read_to_end(response)
    assert response.status == 200 and not complete  # the head arrived, then the connection broke
    assert len(upstream.upstream.requests) == 2


def test_idle_closes_racing_the_next_requests_lose_nothing(upstream: UpstreamThread, tmp_path: Path) -> None:
    """The real race, many times: the upstream closes each kept-alive connection after 100 ms idle, and
    rounds of concurrent requests, stream and not, start around that moment."""
    relay = start_relay(tmp_path, upstream.base_url)
    idle_close = {"x-fake-idle-close-ms": "100"}
    failures: list[str] = []
    rng = random.Random(7)

    def one(body: bytes, target: str) -> None:
        reply = post(relay, body, target, idle_close)
        try:
            (assert_chat_completion if body is CHAT_BODY else lambda r: assert_whole_stream(r, b""))(reply)
        except AssertionError as exc:
            failures.append(f"{reply.status} {exc}")

    try:
        for _ in range(ROUNDS):
            threads = [
                threading.Thread(target=one, args=pick)
                for pick in rng.choices([(CHAT_BODY, "/v1/chat/completions"), (STREAM_BODY, "/v1/chat/completions"), (RESPONSES_STREAM, RESPONSES)], k=6)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            time.sleep(0.1 + rng.uniform(-0.004, 0.004))  # just as the upstream closes the idle ones
        assert failures == []
        assert upstream.upstream.idle_closes > 0  # the upstream did close connections the relay had pooled
    finally:
        relay.stop()
