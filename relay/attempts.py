"""Sending one request upstream until there is an answer to relay.

Each attempt holds a concurrency slot; after a failure the failure table (relay.failures) and two rules
decide whether to try again:
- the keep-alive race: a connection taken from the pool (used before) that ends with no byte of an answer
  was closed by the upstream as the request crossed it, so the upstream cannot have answered it. The
  request goes again at once, on a new connection, in the same slot, once per request
  (`retry_stale_connections`, on by default; browsers do the same);
- the opt-in retry policy (relay.retry), for failures the table allows and for the configured statuses,
  with backoff and a process-wide budget; the slot is released while it sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import time

from relay.deadlines import IDLE, UPSTREAM, Watchdog
from relay.failures import NEVER, UPSTREAM_ERRORS, Failure, Failures, describe
from relay.headers import Header
from relay.observe import Observer, RequestRecord
from relay.retry import Retrier
from relay.seams.aiohttp_internals import nothing_received
from relay.slots import Slots
from relay.upstream import Endpoint, Response

log = logging.getLogger("relay")


class Attempts:
    def __init__(
        self,
        path: str,
        endpoint: Endpoint,
        slots: Slots,
        retrier: Retrier,
        failures: Failures,
        observer: Observer,
        resend_stale: bool,
    ) -> None:
        self.path = path
        self.endpoint = endpoint
        self.slots = slots
        self.retrier = retrier
        self.failures = failures
        self.observer = observer
        self.resend_stale = resend_stale

    async def answer(
        self, query: bytes, headers: list[Header], body: bytes, record: RequestRecord, watchdog: Watchdog
    ) -> Response | Failure:
        """The answer to relay, with its slot still held (give it back with `done()`), or the failure that
        ends the request (logged, no slot held)."""
        self.retrier.admit()
        resend_stale = self.resend_stale
        while True:
            if not self.slots.acquire_now():
                record.slot_wait += await self.slots.acquire()
            answered = False
            fresh = False
            try:
                while True:  # the attempts of one slot: the first, and a resend after a keep-alive race
                    record.attempts += 1
                    sent = time.perf_counter()
                    reused = False
                    try:
                        connection, reused = await self.endpoint.connect(fresh)  # within connect_timeout
                        watchdog.waiting(UPSTREAM)
                        response = await self.endpoint.send(connection, query, headers, body)
                    except UPSTREAM_ERRORS as exc:
                        watchdog.waiting(IDLE)
                        failure = self.failures.classify(exc)
                        self.observer.upstream_failed(record, failure.kind)
                        if resend_stale and reused and _raced(failure, exc):
                            resend_stale, fresh = False, True
                            self._retrying(record, "stale_connection", 0.0)
                            continue
                        delay = self.retrier.after_failure(failure, record.attempts - 1, record.started)
                        if delay is None:
                            log.warning("upstream error on %s -> %d: %s (%s)", self.path, failure.status, failure.message, describe(exc))
                            return failure
                        reason = failure.kind
                    else:
                        delay = self._after_answer(response, record, sent)
                        if delay is None:
                            answered = True
                            return response
                        watchdog.waiting(IDLE)
                        response.close()  # the retried answer is discarded; its connection is not worth draining
                        reason = str(response.status)
                    break
            finally:
                if not answered:
                    self.slots.release()
            self._retrying(record, reason, delay)
            await asyncio.sleep(delay)

    def done(self, response: Response) -> None:
        """The answer has been relayed (or given up on): its slot is free."""
        self.slots.release()

    def _after_answer(self, response: Response, record: RequestRecord, sent: float) -> float | None:
        record.error = None  # an earlier attempt's failure is not this answer's
        record.ttfb = time.perf_counter() - sent
        record.upstream_status = response.status
        try:
            return self.retrier.after_status(response.status, response.headers, record.attempts - 1, record.started)
        except BaseException:
            response.close()
            raise

    def _retrying(self, record: RequestRecord, reason: str, delay: float) -> None:
        self.observer.retrying(reason)
        log.info("retrying %s in %.2f s (attempt %d: %s)", self.path, delay, record.attempts, reason)


def _raced(failure: Failure, exc: BaseException) -> bool:
    """The failure of a reused connection is the keep-alive race: nothing of an answer arrived."""
    return failure.resend != NEVER and (failure.kind == "closed" or nothing_received(exc))
