"""Sending one request upstream until there is an answer to relay.

Each attempt holds the process's concurrency slot and its upstream's own; after a failure before the
answer, the failure table (relay.failures) and three rules decide what comes next:
- the keep-alive race: a connection taken from the pool (used before) that ends with no byte of an answer
  was closed by the upstream as the request crossed it, so the upstream cannot have answered it. The
  request goes again at once, on a new connection to the same upstream, in the same slots, once per
  request (`retry_stale_connections`, on by default; browsers do the same);
- failover: with several upstreams, a failure the table allows to resend (or a status in
  `routing.failover_statuses`) goes at once to another upstream, at most once per upstream; within the
  retry budget unless no upstream can have seen it;
- the opt-in retry policy (relay.retry), with backoff; the slots are released while it sleeps.
With `cluster:`, a round also holds a cluster-wide slot and budget (relay.cluster), taken after the
process's slot and given back with it. Every attempt's outcome feeds its upstream's health (relay.health).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import NamedTuple

from relay.cluster import Gate
from relay.deadlines import IDLE, UPSTREAM_SILENT, Watchdog
from relay.failures import MAYBE_SENT, NEVER, Failure, Failures, describe
from relay.fleet import Fleet, Member
from relay.headers import Header
from relay.observe import Observer, RequestRecord
from relay.retry import Retrier
from relay.seams.aiohttp_internals import nothing_received
from relay.settings import Routing
from relay.slots import Slots
from relay.upstream import Response, Unanswered

log = logging.getLogger("relay")


class Attempts:
    def __init__(
        self,
        path: str,
        fleet: Fleet,
        slots: Slots,
        retrier: Retrier,
        failures: Failures,
        observer: Observer,
        resend_stale: bool,
        routing: Routing,
        cluster: Gate | None = None,
    ) -> None:
        self.path = path
        self.api_path = path.removeprefix("/v1")
        self.fleet = fleet
        self.slots = slots
        self.retrier = retrier
        self.failures = failures
        self.observer = observer
        self.resend_stale = resend_stale
        self.failover = routing.failover and len(fleet.members) > 1
        self.failover_statuses = routing.failover_statuses if self.failover else frozenset()
        self.cluster = cluster

    async def answer(
        self, query: bytes, headers: list[Header], body: bytes, record: RequestRecord, watchdog: Watchdog
    ) -> tuple[Response, Member] | Failure:
        """The answer to relay and its upstream, with their slots still held (give them back with
        `done()`), or the failure that ends the request (logged, no slot held)."""
        self.retrier.admit()
        while True:  # a round per sleep of the retry policy
            if not self.slots.acquire_now():
                record.slot_wait += await self.slots.acquire()
            outcome: tuple[Response, Member] | Failure | _Later = _UNANSWERED
            try:
                outcome = await self._round(query, headers, body, record, watchdog)
            finally:
                if type(outcome) is not tuple:  # no answer to relay: nothing stays held
                    self.slots.release()
                    if self.cluster is not None:
                        self.cluster.release(record, answered=False)
            if type(outcome) is not _Later:
                return outcome  # type: ignore[return-value]
            self._retrying(record, outcome.reason, outcome.delay)
            await asyncio.sleep(outcome.delay)

    async def _round(
        self, query: bytes, headers: list[Header], body: bytes, record: RequestRecord, watchdog: Watchdog
    ) -> tuple[Response, Member] | Failure | _Later:
        """The attempts of one round, in the process's slot: the cluster's slot and an upstream's are taken,
        then the request goes out; again at once after the keep-alive race, and to another upstream on a
        failover. Ends with the answer (its slots held), the failure to report, or a retry for later."""
        if self.cluster is not None:
            refused = await self.cluster.admit(record, body)
            if refused is not None:
                return refused
        member = self.fleet.single or self.fleet.choose(record.affinity, record.tried)
        if member.slots is not None and not member.slots.acquire_now():
            record.slot_wait += await member.slots.acquire()
        self._took(member, record)
        holding, fresh, answered = True, False, False
        try:
            while True:
                record.attempts += 1
                sent = time.perf_counter()
                try:
                    response = await member.endpoints[self.api_path].post(query, headers, body, fresh, watchdog.waiting_upstream)
                except Unanswered as failed:
                    watchdog.waiting(IDLE)
                    failure = self.failures.classify(failed.cause)
                    self.observer.upstream_failed(record, failure.kind)
                    if failed.reused and self._raced(record, failure, failed.cause):
                        fresh = True
                        continue
                    member.last_error = failure.kind
                    member.health.failed()
                    if failure.resend == NEVER or not self._may_fail_over(record, failure.resend == MAYBE_SENT):
                        return self._retry_or_report(failure, failed.cause, record)
                else:
                    delay = self._after_answer(response, member, record, sent)
                    if response.status not in self.failover_statuses or not self._may_fail_over(record, True):
                        if delay is None:
                            answered = True
                            return response, member
                        watchdog.waiting(IDLE)
                        response.close()  # the retried answer is discarded; its connection is not worth draining
                        return _Later(delay, str(response.status))
                    response.close()
                # Failover: at once, to an upstream not tried yet for this request, in the same process slot.
                self._give_back(member, watchdog)
                holding, fresh = False, False
                record.tried = (*record.tried, member)
                member = self.fleet.choose(record.affinity, record.tried)
                self._retrying(record, f"failover to {member.label}", 0.0, "failover")
                if member.slots is not None and not member.slots.acquire_now():
                    record.slot_wait += await member.slots.acquire()
                self._took(member, record)
                holding = True
        finally:
            if holding and not answered:
                self._give_back(member, watchdog)

    def done(self, member: Member, watchdog: Watchdog, record: RequestRecord) -> None:
        """The answer has been relayed, or given up on: its slots are free, and a body the upstream broke
        off or went silent in counts against it."""
        _leave(member)
        self.slots.release()
        if self.cluster is not None:
            self.cluster.release(record, answered=True)
        if record.error == "mid_body" or watchdog.reason == UPSTREAM_SILENT:
            member.health.failed()

    def _took(self, member: Member, record: RequestRecord) -> None:
        member.in_flight += 1
        if member.health.ejections:  # the half-open trial (a healthy one has nothing to note)
            member.health.sent()
        record.upstream = member.label

    def _give_back(self, member: Member, watchdog: Watchdog) -> None:
        _leave(member)
        if watchdog.reason == UPSTREAM_SILENT:  # it took read_timeout without answering
            member.health.failed()
        else:
            member.health.abandoned()

    def _raced(self, record: RequestRecord, failure: Failure, exc: BaseException) -> bool:
        """On a reused connection: the keep-alive race, if nothing of an answer arrived, and the request
        goes again (once) on a new connection."""
        if not self.resend_stale or record.stale_resent or failure.resend == NEVER:
            return False
        if failure.kind != "closed" and not nothing_received(exc):
            return False
        record.stale_resent = True
        self._retrying(record, "stale_connection", 0.0)
        return True

    def _may_fail_over(self, record: RequestRecord, spends: bool) -> bool:
        """Another upstream is left for this request. A request no upstream can have seen (refused, not
        sent) goes there freely: that is routing, and adds no load anywhere. One that may have been
        processed (a reset, a 503) spends the retry budget, which keeps failovers from becoming a storm."""
        if not self.failover or len(record.tried) + 1 >= len(self.fleet.members):
            return False
        return not spends or self.retrier.spend()

    def _retry_or_report(self, failure: Failure, cause: BaseException, record: RequestRecord) -> Failure | _Later:
        delay = self.retrier.after_failure(failure, record.attempts - 1, record.started)
        if delay is not None:
            return _Later(delay, failure.kind)
        log.warning("upstream error on %s -> %d: %s (%s)", self.path, failure.status, failure.message, describe(cause))
        return failure

    def _after_answer(self, response: Response, member: Member, record: RequestRecord, sent: float) -> float | None:
        record.error = None  # an earlier attempt's failure is not this answer's
        record.ttfb = time.perf_counter() - sent
        record.upstream_status = response.status
        if self.cluster is not None:
            self.cluster.upstream_said(response.headers)
        member.answers[response.status] = member.answers.get(response.status, 0) + 1
        if response.status >= 500:
            member.health.failed()
        elif member.health.failures or member.health.ejections:
            member.health.succeeded()
        try:
            return self.retrier.after_status(response.status, response.headers, record.attempts - 1, record.started)
        except BaseException:
            response.close()
            raise

    def _retrying(self, record: RequestRecord, reason: str, delay: float, label: str | None = None) -> None:
        self.observer.retrying(label or reason)
        log.info("retrying %s in %.2f s (attempt %d: %s)", self.path, delay, record.attempts, reason)


class _Later(NamedTuple):
    """Try again after the retry policy's sleep."""

    delay: float
    reason: str


_UNANSWERED = _Later(0.0, "")  # what a round that raised ended with


def _leave(member: Member) -> None:
    """The request no longer counts on this upstream: its in-flight count and its own cap."""
    member.in_flight -= 1
    if member.slots is not None:
        member.slots.release()
