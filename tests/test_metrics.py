"""GET /metrics: after known traffic the counters, histograms and gauges say exactly what happened.

Relays are shared across the session, so every count is a difference between a scrape before and a scrape
after the test's own traffic (taken once no request is in flight). Gauges are absolute: at rest they are 0.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from relay.testing import UpstreamThread
from tests.clients import (
    CHAT_BODY,
    RESPONSES,
    RESPONSES_BODY,
    STREAM_BODY,
    HeldStream,
    Samples,
    assert_chat_completion,
    assert_openai_error,
    connect,
    get,
    post,
    post_bytes,
    read_body_until,
    read_head,
    read_to_end,
    scrape,
    scrape_until,
    scrape_when_idle,
)
from tests.servers import RelayServer, free_port

RelayFactory = Callable[..., RelayServer]
CHAT_LABEL = "chat.completions"  # the endpoint label: the API path without /v1, dotted
RESPONSES_LABEL = "responses"


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def test_request_counts_and_histograms_match_the_traffic(relay: RelayServer, upstream: UpstreamThread) -> None:
    before = scrape_when_idle(relay)
    for _ in range(3):
        assert_chat_completion(post(relay))
    limited = post(relay, RESPONSES_BODY, RESPONSES, headers={"x-fake-status": "429"})
    assert limited.status == 429  # the upstream's answer, passed through
    assert_openai_error(post(relay, b"{nope"), 400, "invalid_json")  # the relay's own answer
    after = scrape_when_idle(relay)

    assert delta(before, after, "relay_requests_total", endpoint=CHAT_LABEL, status="200") == 3
    assert delta(before, after, "relay_requests_total", endpoint=RESPONSES_LABEL, status="429") == 1
    assert delta(before, after, "relay_requests_total", endpoint=CHAT_LABEL, status="400") == 1
    assert delta(before, after, "relay_requests_total", endpoint=RESPONSES_LABEL, status="200") == 0
    # Every answered request has a duration; only those that reached the upstream have a time to first byte.
    assert delta(before, after, "relay_request_duration_seconds_count", endpoint=CHAT_LABEL) == 4
    assert delta(before, after, "relay_request_duration_seconds_count", endpoint=RESPONSES_LABEL) == 1
    assert delta(before, after, "relay_upstream_ttfb_seconds_count", endpoint=CHAT_LABEL) == 3
    assert delta(before, after, "relay_upstream_ttfb_seconds_count", endpoint=RESPONSES_LABEL) == 1
    assert delta(before, after, "relay_request_duration_seconds_sum", endpoint=CHAT_LABEL) > 0
    # The +Inf bucket of a histogram is its count: the buckets were filled, not only the count.
    assert delta(before, after, "relay_upstream_ttfb_seconds_bucket", endpoint=CHAT_LABEL, le="+Inf") == 3
    assert len(upstream.upstream.requests) == 4
    assert after.value("relay_upstream_in_flight") == 0
    assert after.value("relay_slot_waiting") == 0


def test_byte_counters_equal_the_bytes_relayed(relay: RelayServer) -> None:
    before = scrape_when_idle(relay)
    chat = post(relay, CHAT_BODY)
    stream = post(relay, STREAM_BODY)  # SSE: counted as the body bytes, not the chunk framing
    responses = post(relay, RESPONSES_BODY, RESPONSES)
    assert chat.status == stream.status == responses.status == 200
    after = scrape_when_idle(relay)

    sent_to_chat = len(CHAT_BODY) + len(STREAM_BODY)
    assert delta(before, after, "relay_request_bytes_total", endpoint=CHAT_LABEL) == sent_to_chat
    assert delta(before, after, "relay_request_bytes_total", endpoint=RESPONSES_LABEL) == len(RESPONSES_BODY)
    received_from_chat = len(chat.body) + len(stream.body)
    assert delta(before, after, "relay_response_bytes_total", endpoint=CHAT_LABEL) == received_from_chat
    assert delta(before, after, "relay_response_bytes_total", endpoint=RESPONSES_LABEL) == len(responses.body)


def test_refused_upstream_counts_an_upstream_error(relay_factory: RelayFactory) -> None:
    server = relay_factory(upstream_url=f"http://127.0.0.1:{free_port()}/v1")
    before = scrape_when_idle(server)
    assert_openai_error(post(server), 502, "upstream_unreachable")
    after = scrape_when_idle(server)
    assert delta(before, after, "relay_upstream_errors_total", kind="refused") == 1
    assert delta(before, after, "relay_requests_total", endpoint=CHAT_LABEL, status="502") == 1
    assert delta(before, after, "relay_upstream_ttfb_seconds_count", endpoint=CHAT_LABEL) == 0


def test_read_timeout_counts_an_upstream_error(relay_factory: RelayFactory, upstream: UpstreamThread) -> None:
    server = relay_factory(read_timeout=1)
    before = scrape_when_idle(server)
    assert_openai_error(post(server, headers={"x-fake-fault": "hang"}), 504, "upstream_timeout")
    after = scrape_when_idle(server)
    assert delta(before, after, "relay_upstream_errors_total", kind="read_timeout") == 1
    assert delta(before, after, "relay_upstream_errors_total", kind="refused") == 0
    assert delta(before, after, "relay_requests_total", endpoint=CHAT_LABEL, status="504") == 1


def test_failure_mid_stream_counts_an_upstream_error(relay: RelayServer) -> None:
    before = scrape_when_idle(relay)
    with connect(relay.port) as sock:
        sock.sendall(post_bytes(STREAM_BODY, headers={"x-fake-fault": "reset-mid-stream"}))
        response = read_head(sock)
        _, complete = read_to_end(response)
    assert response.status == 200 and not complete
    after = scrape_when_idle(relay)
    assert delta(before, after, "relay_upstream_errors_total", kind="mid_body") == 1
    # The client got a 200 head, and that is what the request counter says.
    assert delta(before, after, "relay_requests_total", endpoint=CHAT_LABEL, status="200") == 1


def test_gauges_and_slot_wait_while_requests_are_held(relay_factory: RelayFactory, upstream: UpstreamThread) -> None:
    server = relay_factory(max_concurrent_requests=1)
    held = HeldStream(events=2)
    upstream.upstream.handler = held
    before = scrape_when_idle(server)
    first, second = connect(server.port), connect(server.port)
    try:
        first.sendall(post_bytes(STREAM_BODY))
        held.let_out(1)
        response = read_head(first)
        read_body_until(response, HeldStream.event(0))  # the first request is mid-stream, holding the slot
        second.sendall(post_bytes(CHAT_BODY))  # cap 1: this one has to wait for the slot
        during = scrape_until(server, lambda s: s.value("relay_slot_waiting") == 1)
        assert during.value("relay_upstream_in_flight") == 1
        assert len(upstream.upstream.requests) == 1  # the waiting request is held in the relay
        held.finish()
        body, complete = read_to_end(response)
        assert complete and HeldStream.event(1) in body
        waited = read_head(second)
        assert waited.status == 200 and read_to_end(waited)[1]
    finally:
        held.finish()
        first.close()
        second.close()
    after = scrape_when_idle(server)
    assert len(upstream.upstream.requests) == 2
    # Only the second request waited: one observation of the wait, and a wait that took time.
    assert delta(before, after, "relay_slot_wait_seconds_count") == 1
    assert delta(before, after, "relay_slot_wait_seconds_sum") > 0


def test_alerting_series_exist_from_the_first_scrape_and_no_created_series(relay_factory: RelayFactory) -> None:
    # rate() needs a series before its first increment; *_created doubles the series and nobody reads it.
    text = get(relay_factory(access_log="plain", timing_header=True), "/metrics").body.decode()
    assert not re.search(r"^\w+_created", text, re.MULTILINE)
    for kind in ("refused", "connect_timeout", "reset", "read_timeout", "mid_body"):
        assert f'relay_upstream_errors_total{{kind="{kind}"}} 0.0' in text
    for reason in ("stale_connection", "reset", "429", "503"):
        assert f'relay_retries_total{{reason="{reason}"}} 0.0' in text
    assert 'relay_refused_total{reason="invalid_host"} 0.0' in text


def test_metrics_off_is_404(relay_factory: RelayFactory) -> None:
    server = relay_factory(metrics=False)
    assert_openai_error(get(server, "/metrics"), 404, "unknown_url")
    assert_chat_completion(post(server))  # the relay still relays without its observer


# --- several workers ---------------------------------------------------------------------------------

WORKER = re.compile(r"Started server process \[(\d+)\]")
BATCH = 10
MAX_BATCHES = 20


def _served_by_each_worker(server: RelayServer, sent: int, timeout: float = 5.0) -> dict[int, float]:
    """Requests each worker counted, read from its own file in the multiprocess directory (which `relay
    serve` created and passed to its workers through the environment), once they add up to `sent`.

    A worker counts a request just after its last byte went out, so the files may be a moment behind."""
    # The relay answers once one worker is up; the other may still be starting.
    server.wait_for_log(r"Application startup complete", count=2)
    pids = [int(pid) for pid in WORKER.findall(server.log())]
    assert len(pids) == 2, server.log()
    environ = Path(f"/proc/{pids[0]}/environ").read_bytes().split(b"\0")
    directory = next(item.split(b"=", 1)[1].decode() for item in environ if item.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
    deadline = time.monotonic() + timeout
    while True:
        served = {pid: _counted_in(os.path.join(directory, f"counter_{pid}.db")) for pid in pids}
        if sum(served.values()) >= sent:
            return served
        assert time.monotonic() < deadline, f"the workers counted {served}, not {sent}"
        time.sleep(0.02)


def _counted_in(path: str) -> float:
    families = MultiProcessCollector.merge([path], accumulate=True) if os.path.exists(path) else []
    return sum(
        sample.value
        for family in families
        for sample in family.samples
        if sample.name == "relay_requests_total" and sample.labels == {"endpoint": CHAT_LABEL, "status": "200"}
    )


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the workers' metric files through /proc")
def test_metrics_add_up_across_workers(relay_factory: RelayFactory) -> None:
    server = relay_factory(args=("--workers", "2"))
    sent = 0
    # New connections until both workers have served some (the kernel picks the worker per connection), so
    # a scrape answered by either worker can only show the total by adding up the other's files too.
    for _ in range(MAX_BATCHES):
        for _ in range(BATCH):
            assert_chat_completion(post(server))
            sent += 1
        served = _served_by_each_worker(server, sent)
        if all(served.values()):
            break
    assert all(served.values()), f"one worker served all {sent} requests: {served}"
    assert sum(served.values()) == sent
    for _ in range(6):  # each scrape goes to whichever worker accepts the connection
        samples = scrape(server)
        assert samples.value("relay_requests_total", endpoint=CHAT_LABEL, status="200") == sent
        assert samples.value("relay_upstream_ttfb_seconds_count", endpoint=CHAT_LABEL) == sent
        assert samples.value("relay_upstream_in_flight") == 0
