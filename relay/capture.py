"""NeMo Gym's per-rollout capture of model calls (`observability_enabled` and `model_call_capture_dir`):
each call under an `/ng-rollout/<id>/` prefix becomes one record (relay.capture_record) appended to
`<dir>/<id>.capture.jsonl`, the file Gym's own servers append to and its collector reads.

Off the hot path: only prefixed calls to the API routes are teed, and only while capture is on. The tee
keeps references to the request's and the answer's chunks as they pass (the answer's up to
`model_call_capture_max_bytes`; past that the record says response_raw_truncated and has no response),
never holds a chunk back, and hands the call to a writer thread once the answer has ended. The thread
builds the record and appends it as Gym does: an exclusive flock, one write, fsync. Unlike Gym, the
relay does not hold the answer's last byte until the record is on disk: the client's next turn never
waits for an fsync, and a reader that opens the file within that fsync's time of the answer may not see
the record yet (Gym's collector reads after the agent's next calls).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay.capture_record import Seen, exchange
from relay.observe import RequestRecord

log = logging.getLogger("relay")

CALL_KEY = "relay.capture"  # the scope key of the Call a prefixed request is teed into
DIALECTS = {"/v1/responses": "responses", "/v1/chat/completions": "chat"}
_WRITERS = 4  # appends of different rollouts go on in parallel; each waits for its own fsync


class Call:
    """One captured call while it runs: what crossed, by reference, and when."""

    __slots__ = ("record", "request", "status", "streaming", "encoding", "chunks", "size", "truncated", "finished", "ttft")

    def __init__(self) -> None:
        self.record: RequestRecord | None = None  # handed over by the proxy (relay.proxy)
        self.request: list[bytes] = []
        self.status: int | None = None
        self.streaming = False
        self.encoding: str | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.truncated = False
        self.finished = False
        self.ttft: float | None = None


class CaptureStore:
    def __init__(self, directory: str, server: str | None, max_bytes: int, max_request_bytes: int) -> None:
        self.directory = directory
        self.server = server
        self.max_bytes = max_bytes
        self.max_request_bytes = max_request_bytes
        self.writers = ThreadPoolExecutor(_WRITERS, thread_name_prefix="relay-capture")

    async def serve(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send, rollout_id: str, dialect: str) -> None:
        """Run `app` for this call with its request and answer teed, then have its record written."""
        call = Call()
        scope[CALL_KEY] = call
        started_at = time.time()
        started = time.perf_counter()

        async def receive_teed() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                call.request.append(message.get("body", b""))
            return message

        async def send_teed(message: Message) -> None:
            if message["type"] == "http.response.start":
                call.status = message["status"]
                call.streaming, call.encoding = _content(message.get("headers", ()))
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if chunk:
                    if call.ttft is None:
                        call.ttft = (time.perf_counter() - started) * 1000
                    self._keep(call, chunk)
                await send(message)
                call.finished = not message.get("more_body", False)
                return
            await send(message)

        try:
            await app(scope, receive_teed, send_teed)
        finally:
            seen = _seen(call, scope, dialect, self.server, started_at, (time.perf_counter() - started) * 1000)
            try:
                self.writers.submit(self._write, rollout_id, seen)
            except RuntimeError:  # the writers stopped: a call that outlived the shutdown
                log.warning("relay: model-call capture of rollout %s lost at shutdown", rollout_id)

    def close(self) -> None:
        """At shutdown: the records of calls that have ended are written before the process goes."""
        self.writers.shutdown(wait=True)

    def _keep(self, call: Call, chunk: bytes) -> None:
        if call.truncated:
            return
        room = self.max_bytes - call.size
        if len(chunk) > room:
            chunk = chunk[:room]
            call.truncated = True
        call.chunks.append(chunk)
        call.size += len(chunk)

    def _write(self, rollout_id: str, seen: Seen) -> None:
        try:
            line = orjson.dumps(exchange(seen, self.max_request_bytes, self.max_bytes), default=str, option=orjson.OPT_APPEND_NEWLINE)
            append(os.path.join(self.directory, f"{rollout_id}.capture.jsonl"), line)
        except Exception:
            log.warning("relay: model-call capture failed for rollout %s", rollout_id, exc_info=True)
            try:  # Gym's mark: this rollout's capture misses a call
                open(os.path.join(self.directory, f"{rollout_id}.capture.incomplete"), "ab").close()
            except OSError:
                log.warning("relay: could not mark the capture of rollout %s incomplete", rollout_id)


def append(path: str, line: bytes) -> None:
    """One record appended the way Gym's CaptureStore appends, so the relay and Gym's servers can share
    a file: under an exclusive flock, one write, flushed to disk before the lock goes."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(descriptor, view) :]
            os.fsync(descriptor)
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


def _seen(call: Call, scope: Scope, dialect: str, server: str | None, started_at: float, latency_ms: float) -> Seen:
    record = call.record
    ended_by = None
    if record is not None and not call.finished:
        ended_by = "cancelled" if record.client_gone else ("timeout" if record.timed_out else "connection")
    headers = scope["headers"]
    return Seen(
        model_call_id=uuid.uuid4().hex,
        dialect=dialect,
        server=server,
        started_at=started_at,
        completed_at=time.time(),
        latency_ms=latency_ms,
        ttft_ms=call.ttft,
        request=b"".join(call.request),
        request_encoding=_header(headers, b"content-encoding"),
        status=call.status,
        streaming=call.streaming,
        body=b"".join(call.chunks),
        body_encoding=call.encoding,
        truncated=call.truncated,
        finished=call.finished,
        ended_by=ended_by,
        session=_only_value(headers, b"x-session-id"),
    )


def _content(headers: Any) -> tuple[bool, str | None]:
    """Is the answer a stream, and its Content-Encoding."""
    streaming = False
    encoding = None
    for name, value in headers:
        if name == b"content-type":
            streaming = value.split(b";", 1)[0].strip().lower() == b"text/event-stream"
        elif name == b"content-encoding":
            encoding = value.decode("latin-1").strip().lower()
    return streaming, encoding


def _header(headers: Any, wanted: bytes) -> str | None:
    value = next((value for name, value in headers if name == wanted), None)
    return None if value is None else value.decode("latin-1").strip().lower()


def _only_value(headers: Any, wanted: bytes) -> str | None:
    """The header's value when the request gives exactly one (Gym's rule for client_session_id)."""
    found = {value for name, value in headers if name == wanted and value}
    return found.pop().decode("latin-1") if len(found) == 1 else None
