"""Relaying an upstream answer to the client: status, end-to-end headers, then each body chunk as soon as
aiohttp has it. No re-chunking, no line splitting, no buffering, no look inside: SSE, JSON and gzip all
pass through the same loop. The last two chunks are kept (references, not copies), so the usage at the
end of a body can be read once the request is over (relay.usage).
"""

from __future__ import annotations

import logging
import time

import aiohttp
from starlette.types import Send

from relay.deadlines import CLIENT, UPSTREAM, Watchdog
from relay.failures import describe
from relay.headers import client_response_headers
from relay.observe import Observer, RequestRecord
from relay.seams.uvicorn_internals import deliberate_aborts
from relay.upstream import Response

log = logging.getLogger("relay")


class ResponseRelay:
    def __init__(self, path: str, observer: Observer, timing_header: bool) -> None:
        self.path = path
        self.observer = observer
        self.timing_header = timing_header

    async def relay(self, response: Response, send: Send, record: RequestRecord, watchdog: Watchdog) -> None:
        headers = client_response_headers(response.raw_headers)
        if self.timing_header:
            headers.append((b"server-timing", _server_timing(record)))
        if record.set_cookie is not None:
            headers.append((b"set-cookie", record.set_cookie))
        record.request_id = response.headers.get("x-request-id")
        record.status = response.status
        content = response.content
        before = last = b""
        try:
            watchdog.waiting(CLIENT)
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            while True:
                watchdog.waiting(UPSTREAM)
                chunk = await content.readany()
                end = not chunk or content.at_eof()
                watchdog.waiting(CLIENT)
                await send({"type": "http.response.body", "body": chunk, "more_body": not end})
                record.bytes_out += len(chunk)
                if chunk:
                    before, last = last, chunk
                if end:
                    break
        except aiohttp.ClientError as exc:
            # Returning without the final body message makes uvicorn close the client's connection:
            # the client sees a truncated body, never a clean end of a partial one.
            response.close()
            self.abort_mid_body(record, describe(exc))
        except BaseException:
            response.close()  # close, not release: release would drain or pool a half-read connection
            raise
        else:
            response.release()
        finally:
            record.last_chunks = (before, last)

    def abort_mid_body(self, record: RequestRecord, cause: str) -> None:
        """The answer cannot be finished: the proxy returns without its end, which uvicorn turns into a
        cut connection (and its log line about it, which the relay's own line below replaces)."""
        self.observer.upstream_failed(record, "mid_body")
        deliberate_aborts.mark()
        log.warning("upstream failed mid-body on %s: %s; client connection aborted", self.path, cause)


def _server_timing(record: RequestRecord) -> bytes:
    before = (time.perf_counter() - record.started - (record.ttfb or 0.0)) * 1000
    upstream = (record.ttfb or 0.0) * 1000
    return f"relay;dur={before:.2f}, upstream;dur={upstream:.2f}".encode()
