"""The retry policy on its own: attempts, budget, backoff bounds, Retry-After forms, what the failure
table allows (relay.retry, relay.failures)."""

from __future__ import annotations

import email.utils
import time

import aiohttp
import pytest

from relay.failures import Failures
from relay.retry import Retrier, _retry_after
from relay.settings import RetryPolicy
from relay.upstream import NotSent

FAILURES = Failures(connect_timeout=10, read_timeout=60, total_timeout=None)
POLICY = RetryPolicy(max_attempts=3, backoff=0.1, max_backoff=1.0, deadline=60, budget_ratio=0.5, budget_burst=2)


def now() -> float:
    return time.perf_counter()


def test_disabled_policy_never_retries() -> None:
    retrier = Retrier(RetryPolicy())
    assert retrier.after_status(429, {}, 0, now()) is None
    assert retrier.after_failure(FAILURES.reset, 0, now()) is None


def test_attempts_bound_the_retries_and_backoff_stays_under_its_ceiling() -> None:
    retrier = Retrier(POLICY)
    first = retrier.after_status(503, {}, 0, now())
    second = retrier.after_status(503, {}, 1, now())
    assert first is not None and 0 <= first <= 0.1  # full jitter below backoff * 2**0
    assert second is not None and 0 <= second <= 0.2
    assert retrier.after_status(503, {}, 2, now()) is None  # the third attempt was the last
    assert retrier.after_status(400, {}, 0, now()) is None  # not a retried status


def test_budget_allows_a_burst_then_a_share_of_the_requests() -> None:
    retrier = Retrier(POLICY)
    assert retrier.after_status(503, {}, 0, now()) is not None
    assert retrier.after_status(503, {}, 0, now()) is not None
    assert retrier.after_status(503, {}, 0, now()) is None  # the burst of 2 is spent
    retrier.admit()  # each request earns half a retry
    assert retrier.after_status(503, {}, 0, now()) is None
    retrier.admit()
    assert retrier.after_status(503, {}, 0, now()) is not None
    for _ in range(100):
        retrier.admit()
    assert retrier.tokens == POLICY.budget_burst  # never more than the burst


def test_deadline_stops_retries_that_would_start_too_late() -> None:
    retrier = Retrier(POLICY)
    assert retrier.after_status(503, {"retry-after": "0.5"}, 0, now() - 59.6) is None  # would start at 60.1 s
    assert retrier.after_status(503, {"retry-after": "0.5"}, 0, now() - 10) == pytest.approx(0.5)


def test_retry_after_is_the_least_wait_and_beyond_max_backoff_ends_retries() -> None:
    retrier = Retrier(POLICY)
    assert retrier.after_status(429, {"retry-after": "0.7"}, 0, now()) == pytest.approx(0.7)
    assert retrier.after_status(429, {"retry-after": "5"}, 0, now()) is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "x", "retry-after": "2"}, 2.0),
        ({"retry-after": "-3"}, 0.0),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_forms(headers: dict[str, str], expected: float | None) -> None:
    assert _retry_after(headers) == expected


def test_retry_after_as_an_http_date() -> None:
    in_ten = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert _retry_after({"retry-after": in_ten}) == pytest.approx(10, abs=1.5)
    assert _retry_after({"retry-after": "Fri, 31 Dec 99999 23:59:59 GMT"}) is None


@pytest.mark.parametrize(
    ("exc", "kind", "retried"),
    [
        (NotSent("closed before the request"), "closed", True),  # nothing left: the safest to send again
        (aiohttp.ServerDisconnectedError(), "reset", True),  # may have been delivered: opt-in only
        (aiohttp.ClientOSError(104, "reset"), "reset", True),
        (aiohttp.ConnectionTimeoutError(), "connect_timeout", True),
        (aiohttp.ClientPayloadError("bad"), "bad_response", False),
    ],
)
def test_the_failure_table_decides_what_may_be_sent_again(exc: BaseException, kind: str, retried: bool) -> None:
    failure = FAILURES.classify(exc)
    assert failure.kind == kind
    assert (Retrier(POLICY).after_failure(failure, 0, now()) is not None) == retried


def test_timeouts_are_never_sent_again() -> None:
    for failure in (FAILURES.read_timeout, FAILURES.total_timeout):
        assert Retrier(POLICY).after_failure(failure, 0, now()) is None
