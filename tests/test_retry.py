"""Opt-in retries (`retry:`): a retryable failure before anything reached the client is tried again, the
same request each time, within attempts, deadline and a process-wide budget; otherwise, and when retries run
out, the upstream's last answer reaches the client unchanged. A read timeout is never retried, and a request
that sleeps before its next attempt does not hold a concurrency slot meanwhile.

The upstream's answers are scripted per request (a custom handler), so each test knows exactly which answer
the client should get, and the upstream's record shows how many attempts there were and in which order.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import orjson
import pytest

from relay.testing import Recorded, Responder, UpstreamThread
from tests.clients import (
    CHAT_BODY,
    Reply,
    assert_chat_completion,
    assert_openai_error,
    connect,
    idle,
    post,
    post_bytes,
    read_reply,
    requests_seen,
    scrape_until,
    scrape_when_idle,
)
from tests.servers import MODEL, RelayServer, free_port

RelayFactory = Callable[..., RelayServer]
# Fast retries: sleeps of at most 50 ms, three attempts.
RETRY = {"max_attempts": 3, "backoff": 0.01, "max_backoff": 0.05, "deadline": 5}
# Patient retries: the upstream may ask for up to 2 s of pause; one slot, to see who holds it.
PATIENT = {"max_attempts": 2, "backoff": 0.01, "max_backoff": 2, "deadline": 5}
CLIENT = "x-test-client"  # which client a request came from, for the handler and the record


@dataclass(frozen=True)
class Answer:
    """One scripted upstream response, written with an exact Content-Length."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    async def send(self, responder: Responder) -> None:
        framing = (("content-type", "application/json"), ("content-length", str(len(self.body))))
        await responder.start(self.status, [*framing, *self.headers])
        await responder.write(self.body)


def refusal(status: int, label: str, **headers: str) -> Answer:
    """An error answer whose body and x-request-id name it, so the client's copy shows which one it got."""
    body = orjson.dumps({"error": {"message": f"{label} says {status}", "type": "requests", "param": None, "code": None}})
    return Answer(status, (("x-request-id", f"req_{label}"), *headers.items()), body)


SUCCESS = Answer(
    200,
    (("x-request-id", "req_success"),),
    orjson.dumps({"object": "chat.completion", "model": MODEL, "choices": []}),
)


class Script:
    """Custom upstream handler: the n-th request gets answers[n], the last answer repeats. It notes when
    each request arrived (wall clock, as Retry-After dates are)."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = answers
        self.arrivals: list[float] = []

    async def __call__(self, request: Recorded, responder: Responder) -> None:
        self.arrivals.append(time.time())
        await self.answers[min(len(self.arrivals), len(self.answers)) - 1].send(responder)


class PerClient:
    """Custom upstream handler: a Script for each value of the CLIENT header."""

    def __init__(self, scripts: Mapping[str, Script]) -> None:
        self.scripts = scripts

    async def __call__(self, request: Recorded, responder: Responder) -> None:
        await self.scripts[request.header(CLIENT) or ""](request, responder)


def assert_unchanged(reply: Reply, answer: Answer) -> None:
    """The client got exactly this upstream answer: status, body bytes and every header it carried."""
    assert reply.status == answer.status
    assert reply.body == answer.body
    for name, value in answer.headers:
        assert reply.header(name) == value, name


@pytest.fixture(scope="module")
def retrying(relay_factory: RelayFactory) -> RelayServer:
    return relay_factory(retry=RETRY, read_timeout=1)


@pytest.fixture(scope="module")
def patient(relay_factory: RelayFactory) -> RelayServer:
    return relay_factory(retry=PATIENT, max_concurrent_requests=1)


def test_429s_are_retried_until_the_upstream_answers(retrying: RelayServer, upstream: UpstreamThread) -> None:
    limited = refusal(429, "limited", **{"retry-after-ms": "10"})
    upstream.upstream.handler = Script(limited, limited, SUCCESS)
    assert_unchanged(post(retrying), SUCCESS)
    attempts = requests_seen(upstream, 3)
    # The same request each time: body, path and headers.
    assert len({(seen.path, seen.body, tuple(seen.headers)) for seen in attempts}) == 1


def test_without_retries_the_first_429_reaches_the_client(relay: RelayServer, upstream: UpstreamThread) -> None:
    limited = refusal(429, "limited", **{"retry-after-ms": "10", "x-ratelimit-remaining-requests": "0"})
    upstream.upstream.handler = Script(limited, SUCCESS)
    assert_unchanged(post(relay), limited)
    requests_seen(upstream, 1)


def test_when_attempts_run_out_the_last_answer_reaches_the_client(
    retrying: RelayServer, upstream: UpstreamThread
) -> None:
    last = refusal(502, "third", **{"retry-after-ms": "1"})
    upstream.upstream.handler = Script(refusal(429, "first"), refusal(503, "second"), last, SUCCESS)
    assert_unchanged(post(retrying), last)
    requests_seen(upstream, 3)


def test_status_outside_the_retried_ones_is_not_retried(retrying: RelayServer, upstream: UpstreamThread) -> None:
    failed = refusal(500, "failed")
    upstream.upstream.handler = Script(failed, SUCCESS)
    assert_unchanged(post(retrying), failed)
    requests_seen(upstream, 1)


def test_retry_after_beyond_max_backoff_passes_the_429_through(
    retrying: RelayServer, upstream: UpstreamThread
) -> None:
    # The upstream asks for 1 s; the relay may wait at most 50 ms, so the client gets to decide.
    limited = refusal(429, "limited", **{"retry-after": "1"})
    upstream.upstream.handler = Script(limited, SUCCESS)
    assert_unchanged(post(retrying), limited)
    requests_seen(upstream, 1)


def test_retry_after_as_an_http_date_is_waited_for(patient: RelayServer, upstream: UpstreamThread) -> None:
    # A whole second 1 to 2 s ahead (HTTP dates have no fractions), within max_backoff 2.
    until = int(time.time()) + 2
    limited = refusal(429, "limited", **{"retry-after": email.utils.formatdate(until, usegmt=True)})
    script = Script(limited, SUCCESS)
    upstream.upstream.handler = script
    assert_unchanged(post(patient), SUCCESS)
    requests_seen(upstream, 2)
    # The date was read, not ignored: the retry waited for it (a small allowance for timer granularity).
    assert script.arrivals[1] >= until - 0.05, (script.arrivals, until)


def test_retry_after_date_beyond_max_backoff_passes_the_429_through(
    patient: RelayServer, upstream: UpstreamThread
) -> None:
    # Had the date been unreadable, the relay would have retried after its own short backoff.
    limited = refusal(429, "limited", **{"retry-after": email.utils.formatdate(time.time() + 60, usegmt=True)})
    upstream.upstream.handler = Script(limited, SUCCESS)
    assert_unchanged(post(patient), limited)
    requests_seen(upstream, 1)


def test_no_retry_past_the_deadline(relay_factory: RelayFactory, upstream: UpstreamThread) -> None:
    # The pause the upstream asks for is allowed (under max_backoff) but would end after the deadline.
    server = relay_factory(retry={**RETRY, "max_backoff": 2, "deadline": 0.5})
    limited = refusal(429, "limited", **{"retry-after-ms": "1000"})
    upstream.upstream.handler = Script(limited, SUCCESS)
    assert_unchanged(post(server), limited)
    requests_seen(upstream, 1)


def test_refused_connection_is_retried_then_502(relay_factory: RelayFactory) -> None:
    server = relay_factory(upstream_url=f"http://127.0.0.1:{free_port()}/v1", retry=RETRY, access_log="plain")
    assert_openai_error(post(server), 502, "upstream_unreachable")
    # Nobody listens, so the relay's log is the witness: two retries, then one answer after three attempts.
    retries = server.wait_for_log(r"retrying /v1/chat/completions in [\d.]+ s \(attempt (\d): refused\)", 2)
    assert [match.group(1) for match in retries] == ["1", "2"]
    (answered,) = server.wait_for_log(r"method=POST .*status=502 .*attempts=(\d+)")
    assert answered.group(1) == "3"


def test_budget_stops_a_retry_storm(relay_factory: RelayFactory, upstream: UpstreamThread) -> None:
    # Two retries in the bucket and no refill: ten requests to an upstream that always fails add two at most.
    server = relay_factory(retry={**RETRY, "budget_burst": 2, "budget_ratio": 0})
    for _ in range(10):
        assert post(server, headers={"x-fake-status": "503"}).status == 503
    total = len(upstream.upstream.requests)
    assert 10 < total <= 12, total  # some retries ran (the budget is not zero), no more than it allowed


def test_read_timeout_is_not_retried(retrying: RelayServer, upstream: UpstreamThread) -> None:
    # The upstream may still be working on it, and the client has already waited read_timeout.
    assert_openai_error(post(retrying, headers={"x-fake-fault": "hang"}), 504, "upstream_timeout")
    requests_seen(upstream, 1)


def test_slot_is_free_while_a_retry_sleeps(patient: RelayServer, upstream: UpstreamThread) -> None:
    # Cap 1. A is told to come back in 1 s; meanwhile the slot is free, and B, sent then, gets it.
    first = Script(refusal(429, "limited", **{"retry-after-ms": "1000"}), SUCCESS)
    upstream.upstream.handler = PerClient({"A": first, "B": Script(SUCCESS)})
    with connect(patient.port) as sock_a:
        sock_a.sendall(post_bytes(CHAT_BODY, headers={CLIENT: "A"}))
        assert upstream.wait_for(lambda u: len(u.requests) == 1)
        # No request in flight while A sleeps: seen before A's second attempt reached the upstream.
        scrape_until(patient, idle)
        assert len(upstream.upstream.requests) == 1, "the slot was free only once A's retry was over"
        assert_chat_completion(post(patient, headers={CLIENT: "B"}))
        reply_a = read_reply(sock_a)
    assert_unchanged(reply_a, SUCCESS)
    # Who reached the upstream when: B's request came between A's two attempts.
    assert [seen.header(CLIENT) for seen in requests_seen(upstream, 3)] == ["A", "B", "A"]


def test_unreadable_retry_after_date_counts_as_absent(retrying: RelayServer, upstream: UpstreamThread) -> None:
    # A date past what any clock holds: it must neither crash the exchange nor stop the retry.
    far = {"retry-after": "Mon, 01 Jan 99999999999 00:00:00 GMT"}
    upstream.upstream.handler = Script(refusal(429, "first", **far), SUCCESS)
    assert_unchanged(post(retrying), SUCCESS)
    requests_seen(upstream, 2)


def test_retries_and_the_failures_they_mend_are_counted(retrying: RelayServer, upstream: UpstreamThread) -> None:
    before = scrape_when_idle(retrying)
    upstream.upstream.handler = Script(refusal(503, "first"), refusal(429, "second"), SUCCESS)
    assert_unchanged(post(retrying), SUCCESS)
    after = scrape_when_idle(retrying)
    for reason in ("503", "429"):
        assert after.value("relay_retries_total", reason=reason) - before.value("relay_retries_total", reason=reason) == 1
