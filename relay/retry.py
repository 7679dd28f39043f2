"""When to try an upstream request again, and how long to wait first.

Retries are opt-in (`retry.max_attempts` > 1) and happen only while nothing has reached the client. Three
limits keep them from ever becoming a storm: attempts per request, a deadline per request, and a
process-wide budget that lets retries add at most `budget_ratio` of the request rate (plus a burst).
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Mapping

from relay.failures import NEVER, Failure
from relay.settings import RetryPolicy


class Retrier:
    def __init__(self, policy: RetryPolicy, failover: bool = False) -> None:
        """`failover`: several upstreams, whose failovers spend the same budget as retries."""
        self.policy = policy
        self.enabled = policy.enabled or failover
        self.tokens = float(policy.budget_burst)

    def admit(self) -> None:
        """A new request earns the budget a fraction of a retry."""
        if self.enabled:
            self.tokens = min(self.policy.budget_burst, self.tokens + self.policy.budget_ratio)

    def spend(self) -> bool:
        """Take one resend from the budget (a failover), if there is one left."""
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    # `started` is the request's arrival, in time.perf_counter() seconds.
    def after_status(self, status: int, headers: Mapping[str, str], attempt: int, started: float) -> float | None:
        """Seconds to wait before trying again after this response, or None to relay it."""
        if status not in self.policy.statuses:
            return None
        return self._delay(attempt, started, _retry_after(headers))

    def after_failure(self, failure: Failure, attempt: int, started: float) -> float | None:
        """Seconds to wait before trying again after this failure, or None to report it. The failure
        table decides which may be sent again (a read timeout never: the upstream may still be working
        on the request, and the client has already waited that long)."""
        if failure.resend == NEVER:
            return None
        return self._delay(attempt, started, None)

    def _delay(self, attempt: int, started: float, server_asked: float | None) -> float | None:
        policy = self.policy
        if not policy.enabled or attempt + 1 >= policy.max_attempts or self.tokens < 1:
            return None
        ceiling = min(policy.max_backoff, policy.backoff * 2**attempt)
        delay = random.uniform(0, ceiling)  # full jitter spreads the retries of many clients apart
        if server_asked is not None:
            if server_asked > policy.max_backoff:
                return None  # the upstream asks for a longer pause than allowed: its answer goes to the client
            delay = max(delay, server_asked)
        if time.perf_counter() + delay - started > policy.deadline:
            return None
        self.tokens -= 1
        return delay


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """OpenAI's retry-after-ms, else Retry-After in seconds or as an HTTP date."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):  # not a date, or one no clock can hold
        return None
