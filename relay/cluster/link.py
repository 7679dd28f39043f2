"""Whether this process can reach the cluster's Redis: every call's outcome goes through `Link`, which
logs a change of state once (never once per request) and counts the failures for the metrics."""

from __future__ import annotations

import logging

log = logging.getLogger("relay")


class Link:
    def __init__(self, name: str, on_error: str) -> None:
        self.name = name
        self.ok = True  # until a call fails: the first renewal, at start-up, finds out
        self.errors = 0  # failed calls since the metrics' last flush
        self._meaning = (
            "each process keeps an even share of the limits (on_redis_error: local)"
            if on_error == "local"
            else "new requests are refused with 503 (on_redis_error: fail)"
        )

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        if self.ok:
            self.ok = False
            log.warning("relay: cluster %s: Redis unreachable (%s); %s until it answers", self.name, _describe(exc), self._meaning)

    def answered(self) -> bool:
        """A call succeeded; True if that ends an outage."""
        if self.ok:
            return False
        self.ok = True
        log.warning("relay: cluster %s: Redis answers again; cluster-wide limits restored", self.name)
        return True


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
