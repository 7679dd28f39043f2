"""A fast fake OpenAI-compatible upstream for the tests, the benchmark and the local mode.

The tests script it in a thread of the test process (``UpstreamThread``), ``make bench`` runs it as a
process (``python -m relay.testing``) to measure the relay against, and local mode (``relay serve
--local``, what ``make run`` does without env.yaml) relays to it so the relay can be tried with no key
and no network.

It answers ``POST .../chat/completions`` and ``POST .../responses`` with realistic,
byte-for-byte deterministic JSON or SSE bodies, so bytes fetched through the relay can
be compared with bytes fetched from here directly. It has to be much faster than the
relay it measures, hence a bare ``asyncio.Protocol`` over httptools with canned bodies
cached per (endpoint, stream, events, size, ...) instead of a web framework.

Behaviour is driven by request headers, which a relay forwards end to end:

``x-fake-events: N``            SSE events per stream (default 20)
``x-fake-delay-ms: F``          wait before the response headers (model "think" time)
``x-fake-event-delay-ms: F``    wait between SSE events
``x-fake-size: BYTES``          approximate JSON body size, or content size of each SSE event
``x-fake-status: CODE``         answer CODE with an OpenAI error body
``x-fake-headers: {json}``      extra response headers, for any response (in place of a canned one of the same name)
``x-fake-gzip: 1``              gzip a JSON body (mtime 0, so still deterministic)
``x-fake-fault: NAME``          reset-before-headers, hang, reset-mid-body, reset-mid-stream,
                                stall-mid-stream, close-after-response or close-when-reused
                                (answer, keep the connection, then close it unread as soon as
                                the next request arrives on it: the keep-alive race)
``x-fake-idle-close-ms: F``     after answering, close the kept-alive connection once it has been
                                idle F ms (what uvicorn does after its timeout_keep_alive, 5 s)

Tests can instead install ``FakeUpstream.handler`` and write each response themselves
through a ``Responder``. ``UpstreamThread`` runs the server on its own loop for sync code.

CLI: ``python -m relay.testing --host 127.0.0.1 --port 9000 [--record]``.

Modules, one job each: ``recorded`` (the request as received, the handler type), ``canned`` (cached
response bytes, framing, error bodies), ``bodies`` (the chat and responses bodies, JSON and SSE),
``directives`` (x-fake-* parsing and the wire plan), ``connection`` (the protocol), ``responder`` (what
a custom handler writes with), ``server`` (FakeUpstream, UpstreamThread), ``ports`` (free_port) and
``__main__`` (the CLI).
"""

from relay.testing.ports import free_port
from relay.testing.recorded import Handler, Recorded
from relay.testing.responder import Responder
from relay.testing.server import FakeUpstream, UpstreamThread

__all__ = ["FakeUpstream", "Handler", "Recorded", "Responder", "UpstreamThread", "free_port"]
