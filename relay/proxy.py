"""The relay core: the ASGI endpoint behind POST /v1/chat/completions and POST /v1/responses.

A request's path through it:
  1. Intake (relay.intake): read the body (bounded), check it, patch model and extra_body
  2. Attempts (relay.attempts): take a concurrency slot, post to the same path under the upstream base
     URL (relay.upstream), try again where the failure table and the retry policy allow
  3. ResponseRelay (relay.relaying): status, headers and body chunks as they arrive
Giving up on a request (its client left or stopped reading, the upstream went silent, total_timeout
passed) is the Watchdog (relay.deadlines) cancelling its task, which closes the upstream connection and
frees the slot; what the client then gets is decided here, in `_gave_up`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.types import Receive, Scope, Send

from relay.affinity import ROLLOUT_KEY
from relay.attempts import Attempts
from relay.capture import CALL_KEY
from relay.client_connection import CLIENT_KEY, ClientConnection
from relay.deadlines import CLIENT, TOO_LONG, UPSTREAM_SILENT, Watchdog, shortest, watch_disconnect
from relay.failures import Failure, Failures
from relay.headers import upstream_request_headers
from relay.intake import Intake
from relay.observe import Observer, RequestRecord
from relay.relaying import ResponseRelay
from relay.replies import allow_header, send_error, send_not_allowed
from relay.settings import Settings

log = logging.getLogger("relay")

_ALLOW = allow_header(("POST",))


class Proxy:
    def __init__(
        self,
        path: str,
        settings: Settings,
        intake: Intake,
        attempts: Attempts,
        relay: ResponseRelay,
        failures: Failures,
        observer: Observer,
    ) -> None:
        self.path = path
        self.intake = intake
        self.attempts = attempts
        self.relay = relay
        self.observer = observer
        self.deadlines = (None, settings.read_timeout, settings.client_write_timeout)  # by IDLE, UPSTREAM, CLIENT
        self.total_timeout = settings.total_timeout
        self.check_every = shortest(*self.deadlines, self.total_timeout)
        self.timed_out = {UPSTREAM_SILENT: failures.read_timeout, TOO_LONG: failures.total_timeout}
        # Only the access log and capture care which rollout a request belongs to (relay.rollouts).
        self.rollouts = settings.access_log != "off" or settings.capture_dir is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await send_not_allowed(scope, send, _ALLOW)
            return
        record = RequestRecord(self.path, time.perf_counter())
        if self.rollouts:  # one attribute check when the access log and capture are both off
            _note_rollout(scope, record)
        try:
            body = await self.intake.read(scope, receive, send, record)
            if body is not None:
                await self._forward(scope, receive, send, body, record)
        finally:
            self.observer.finish(record)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, body: bytes, record: RequestRecord) -> None:
        """Exchange with the upstream until the answer is relayed, or the watchdog gives up on it."""
        headers = upstream_request_headers(scope["headers"])
        client: ClientConnection | None = scope.get(CLIENT_KEY)
        task = asyncio.current_task()
        assert task is not None
        watchdog = Watchdog(task, self.deadlines, self.total_timeout, self.check_every)
        stop_watching = watch_disconnect(client, receive, watchdog)
        try:
            answer = await self.attempts.answer(scope["query_string"], headers, body, record, watchdog)
            if isinstance(answer, Failure):
                await self._reply_failure(send, answer, record)
                return
            response, member = answer
            try:
                await self.relay.relay(response, send, record, watchdog)
            finally:
                self.attempts.done(member, watchdog, record)
        except asyncio.CancelledError:
            if watchdog.reason is None or task.uncancel() > 0:
                raise  # cancelled by someone else (shutdown): not ours to swallow
            await self._gave_up(watchdog, send, record, client)
        finally:
            # No await stands between the last send and here, so the watch cannot mistake the completed
            # response (which uvicorn reports as http.disconnect) for a client that left.
            stop_watching()
            watchdog.stop()

    async def _gave_up(self, watchdog: Watchdog, send: Send, record: RequestRecord, client: ClientConnection | None) -> None:
        """What the client gets once the watchdog gave up: a timeout before the answer is a 504; during
        the body, a cut connection; a client that left gets nothing (499 in the records)."""
        reason = watchdog.reason
        assert reason is not None
        timed_out = self.timed_out.get(reason)
        if timed_out is not None:
            record.timed_out = True
            if record.status == 0:
                self.observer.upstream_failed(record, timed_out.kind)
                log.warning("upstream error on %s -> %d: %s", self.path, timed_out.status, timed_out.message)
                await self._reply_failure(send, timed_out, record)
                return
            self.relay.abort_mid_body(record, timed_out.message)
        else:
            record.client_gone = True
            if record.status == 0:
                record.status = 499  # nginx's "client closed request": nothing was sent
            log.debug("%s on %s; upstream request cancelled", reason, self.path)
        if watchdog.phase == CLIENT and client is not None:
            # Given up while a send to the client waited: uvicorn's close would wait for the client to read
            # what is buffered, and one that stopped reading never will.
            client.abort()

    async def _reply_failure(self, send: Send, failure: Failure, record: RequestRecord) -> None:
        record.status = failure.status
        await send_error(send, failure.status, failure.message, type=failure.type, code=failure.code, headers=failure.headers)


def _note_rollout(scope: Scope, record: RequestRecord) -> None:
    """The rollout id for the access log; the record for the capture of this call, which reads how it
    ended (relay.capture)."""
    record.rollout_id = scope.get(ROLLOUT_KEY)
    call = scope.get(CALL_KEY)
    if call is not None:
        call.record = record
