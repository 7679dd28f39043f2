"""One upstream's health as this process sees it: a circuit breaker fed by its answers (and an optional
active probe, relay.probe).

Closed: requests flow. After `eject_after` failures in a row (connect failures, resets, timeouts, 5xx)
it opens: the upstream is ejected for `eject_seconds`, doubling each time it opens again without having
recovered, up to `max_eject_seconds`. Once that has passed it is half-open: one request (or probe) tries
it; success closes the circuit and forgets the back-off, failure opens it again for longer.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "healthy", "ejected", "probing"


class Health:
    __slots__ = ("eject_after", "eject_seconds", "max_eject_seconds", "_now", "failures", "ejections", "until", "trial")

    def __init__(
        self, eject_after: int, eject_seconds: float, max_eject_seconds: float, now: Callable[[], float] = time.monotonic
    ) -> None:
        self.eject_after = eject_after
        self.eject_seconds = eject_seconds
        self.max_eject_seconds = max_eject_seconds
        self._now = now
        self.failures = 0  # in a row
        self.ejections = 0  # in a row, without a recovery between them
        self.until = 0.0  # while ejected: when it may be tried again
        self.trial = False  # a half-open trial request is out

    @property
    def state(self) -> str:
        if self.ejections == 0:
            return CLOSED
        return HALF_OPEN if self._now() >= self.until else OPEN

    def usable(self) -> bool:
        """May a request go there now? While half-open, only the one trial request may."""
        if self.ejections == 0:
            return True
        return self._now() >= self.until and not self.trial

    def sent(self) -> None:
        """A request goes there (the half-open trial, if it is ejected)."""
        if self.ejections:
            self.trial = True

    def abandoned(self) -> None:
        """The request ended with no verdict on the upstream (its client left): the trial is free again."""
        self.trial = False

    def succeeded(self) -> None:
        self.failures = 0
        self.ejections = 0
        self.trial = False

    def failed(self) -> bool:
        """Counts a failure; True when it ejects the upstream (now, or again after a failed trial)."""
        self.failures += 1
        if self.ejections and self.trial or self.failures >= self.eject_after and not self.ejections:
            self.trial = False
            self.ejections += 1
            backoff = min(self.max_eject_seconds, self.eject_seconds * 2 ** (self.ejections - 1))
            self.until = self._now() + backoff
            return True
        return False

    def ejected_for(self) -> float:
        """Seconds until it may be tried again (0 when usable)."""
        return max(0.0, self.until - self._now()) if self.ejections else 0.0
