"""The one table of upstream failures: for each kind, what the client gets, the metrics label, and
whether the request may be sent again.

Whether a failed request may be sent again depends on one question only: could the upstream have seen
it? `NOT_SENT`: no (the connection never opened, or was found closed before a byte was written): sending
it again cannot duplicate anything. `MAYBE_SENT`: the request was written and the connection ended
before an answer; the upstream may have received it, so only the opt-in `retry` policy (and failover
between upstreams) send it again, and the keep-alive race rule (relay.attempts) on a reused connection.
`NEVER`: the upstream answered, or may still be working on it.
"""

from __future__ import annotations

from typing import NamedTuple

import aiohttp

from relay.headers import Header
from relay.upstream import NotSent

NOT_SENT, MAYBE_SENT, NEVER = "not_sent", "maybe_sent", "never"

class Failure(NamedTuple):
    kind: str  # the metrics label and the access log's `error`
    status: int  # what the client gets when this ends its request before the response
    code: str
    message: str
    resend: str  # NOT_SENT, MAYBE_SENT or NEVER
    type: str = "upstream_error"  # the error body's `type`
    headers: tuple[Header, ...] = ()  # sent with the error (retry-after)


class Failures:
    """The table, with messages that quote the configured timeouts."""

    def __init__(self, connect_timeout: float | None, read_timeout: float | None, total_timeout: float | None) -> None:
        self.connect_timeout = Failure(
            "connect_timeout", 504, "upstream_timeout",
            f"could not connect to the upstream within connect_timeout ({connect_timeout} s)", NOT_SENT,
        )  # fmt: skip
        self.closed = Failure(
            "closed", 502, "upstream_disconnected", "the upstream connection closed before the request was written", NOT_SENT
        )
        self.reset = Failure("reset", 502, "upstream_disconnected", "the upstream closed the connection before answering", MAYBE_SENT)
        self.bad_response = Failure("bad_response", 502, "bad_upstream_response", "the upstream's answer could not be read as HTTP", NEVER)
        self.read_timeout = Failure(
            "read_timeout", 504, "upstream_timeout", f"the upstream sent nothing for read_timeout ({read_timeout} s)", NEVER
        )
        self.total_timeout = Failure(
            "total_timeout", 504, "upstream_timeout", f"the upstream did not finish within total_timeout ({total_timeout} s)", NEVER
        )

    def classify(self, exc: BaseException) -> Failure:
        """What a failure before the response's head means; `exc` is one of relay.upstream.UPSTREAM_ERRORS."""
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return self.connect_timeout
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            message = f"cannot resolve the upstream host {exc.host}: {exc.os_error.strerror or exc.os_error}"
            return Failure("dns", 502, "upstream_unreachable", message, NOT_SENT)
        if isinstance(exc, aiohttp.ClientConnectorError):
            message = f"cannot connect to the upstream {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}"
            return Failure("refused", 502, "upstream_unreachable", message, NOT_SENT)
        if isinstance(exc, NotSent):
            return self.closed
        if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientConnectionResetError)):
            return self.reset
        return self.bad_response


# Failure kinds, for metrics that start at zero: every kind above, and a failure in the middle of a body.
KINDS = ("refused", "dns", "connect_timeout", "closed", "reset", "bad_response", "read_timeout", "total_timeout", "mid_body")


def describe(exc: BaseException) -> str:
    """One log line for an exception (aiohttp's parser errors span several)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
