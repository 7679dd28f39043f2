"""Several upstreams behind one relay, over real sockets: spread and weights, conversations that stay on one
upstream (X-Session-ID, prompt_cache_key) with bounded load, failover and ejection when an upstream
refuses, answers 503 or hangs, no failover once a body has begun, and the same choice in every worker."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest

from relay.testing import Recorded, Responder, UpstreamThread, free_port
from tests.clients import CHAT, CHAT_BODY, Reply, assert_chat_completion, connect, get, post, post_bytes, read_head, read_to_end
from tests.servers import MODEL, RelayServer, start_relay

FAST_EJECTION = {"eject_after": 3, "eject_seconds": 0.5, "max_eject_seconds": 2}


@pytest.fixture(scope="module")
def three() -> Iterator[list[UpstreamThread]]:
    threads = [UpstreamThread().start() for _ in range(3)]
    yield threads
    for thread in threads:
        thread.stop()


@pytest.fixture(autouse=True)
def _fresh(three: list[UpstreamThread]) -> None:
    for thread in three:
        thread.upstream.reset()


def fleet_relay(tmp_path: Path, urls: list[object], **config: object) -> RelayServer:
    return start_relay(tmp_path, "unused", openai_base_url=urls, **config)


def served_by(threads: list[UpstreamThread]) -> list[int]:
    return [len(thread.upstream.requests) for thread in threads]


def many(count: int, send: Callable[[int], Reply], workers: int = 16) -> list[Reply]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(send, range(count)))


def with_session(key: str, body: bytes = CHAT_BODY) -> Callable[[RelayServer], Reply]:
    return lambda relay: post(relay, body, CHAT, {"X-Session-ID": key})


def test_requests_without_a_key_spread_evenly_and_by_weight(three: list[UpstreamThread], tmp_path: Path) -> None:
    relay = fleet_relay(tmp_path / "even", [t.base_url for t in three])
    try:
        replies = many(3000, lambda _: post(relay))
        assert all(reply.status == 200 for reply in replies)
        assert all(abs(count - 1000) <= 100 for count in served_by(three)), served_by(three)
    finally:
        relay.stop()
    for thread in three:
        thread.upstream.reset()
    weighted = fleet_relay(tmp_path / "weighted", [{"url": t.base_url, "weight": w} for t, w in zip(three, (1, 2, 3))])
    try:
        many(3000, lambda _: post(weighted), workers=4)
        for count, weight in zip(served_by(three), (1, 2, 3)):
            assert abs(count - 500 * weight) <= 50 * weight, served_by(three)
    finally:
        weighted.stop()


@pytest.mark.parametrize("carrier", ["x-session-id", "prompt_cache_key"])
def test_every_turn_of_a_conversation_lands_on_the_same_upstream(
    three: list[UpstreamThread], tmp_path: Path, carrier: str
) -> None:
    relay = fleet_relay(tmp_path, [t.base_url for t in three])

    def turn(number: int) -> Reply:
        conversation = f"rollout-{number % 300}"
        if carrier == "x-session-id":
            return post(relay, orjson.dumps({"messages": [], "metadata": {"c": conversation}}), CHAT, {"X-Session-ID": conversation})
        return post(relay, orjson.dumps({"input": "hi", "prompt_cache_key": conversation, "metadata": {"c": conversation}}), "/v1/responses")

    try:
        # 300 conversations of 5 turns, a few at a time: below the bound's floor, nothing spills over.
        assert all(reply.status == 200 for reply in many(1500, turn, workers=3))
        homes: dict[str, set[int]] = collections.defaultdict(set)
        for index, thread in enumerate(three):
            for request in thread.upstream.requests:
                homes[request.json()["metadata"]["c"]].add(index)
        assert len(homes) == 300 and all(len(where) == 1 for where in homes.values())
        assert all(count > 300 for count in served_by(three))  # and the conversations spread
    finally:
        relay.stop()


def test_a_hot_conversation_spills_over_instead_of_overloading_its_upstream(three: list[UpstreamThread], tmp_path: Path) -> None:
    relay = fleet_relay(tmp_path, [t.base_url for t in three], routing={"load_factor": 1.25})
    slow = {"x-fake-delay-ms": "400"}
    try:
        def send(number: int) -> Reply:
            key = "hot" if number < 60 else f"cold-{number}"
            return post(relay, CHAT_BODY, CHAT, {"X-Session-ID": key, **slow})

        assert all(reply.status == 200 for reply in many(90, send, workers=90))
        peaks = [thread.upstream.max_in_flight for thread in three]
        assert max(peaks) <= 38, peaks  # ceil(1.25 * 90 / 3): the bound at the busiest moment
        assert sum(1 for count in served_by(three) if count) == 3
    finally:
        relay.stop()


def test_a_refusing_upstream_costs_no_client_an_error_is_ejected_and_comes_back(
    three: list[UpstreamThread], tmp_path: Path
) -> None:
    dead_port = free_port()
    urls = [three[0].base_url, three[1].base_url, f"http://127.0.0.1:{dead_port}/v1"]
    relay = fleet_relay(tmp_path, urls, routing=FAST_EJECTION)
    try:
        replies = many(300, lambda n: post(relay, CHAT_BODY, CHAT, {"X-Session-ID": f"k{n}"}))
        assert [reply.status for reply in replies] == [200] * 300  # failed over before any byte reached a client
        view = get(relay, "/health/upstreams").json()["upstreams"]
        assert view[2]["state"] in ("ejected", "probing") and view[2]["last_error"] == "refused"
        assert get(relay, "/readyz").status == 200  # two can still serve
        revived = UpstreamThread(port=dead_port).start()
        try:
            deadline = time.monotonic() + 10
            while not revived.upstream.requests:  # its keys come back once a trial succeeds
                assert time.monotonic() < deadline, "the upstream never got traffic again"
                many(30, lambda n: post(relay, CHAT_BODY, CHAT, {"X-Session-ID": f"k{n}"}), workers=4)
            assert get(relay, "/health/upstreams").json()["upstreams"][2]["state"] == "healthy"
        finally:
            revived.stop()
    finally:
        relay.stop()


def test_a_request_no_upstream_saw_fails_over_whatever_the_retry_budget(three: list[UpstreamThread], tmp_path: Path) -> None:
    # A budget of one resend, and an upstream that keeps refusing (never ejected): the refused requests
    # still all go elsewhere, since no upstream can have seen them.
    urls = [three[0].base_url, f"http://127.0.0.1:{free_port()}/v1"]
    relay = fleet_relay(tmp_path, urls, routing={"eject_after": 10_000}, retry={"budget_burst": 1, "budget_ratio": 0})
    try:
        replies = many(100, lambda n: post(relay, CHAT_BODY, CHAT, {"X-Session-ID": f"k{n}"}), workers=4)
        assert [reply.status for reply in replies] == [200] * 100
        assert len(three[0].upstream.requests) == 100
    finally:
        relay.stop()


def test_an_upstream_answering_503_is_failed_over_and_ejected(three: list[UpstreamThread], tmp_path: Path) -> None:
    async def unavailable(request: Recorded, responder: Responder) -> None:
        body = b'{"error":{"message":"overloaded","type":"server_error","param":null,"code":null}}'
        await responder.start(503, [("content-type", "application/json"), ("content-length", str(len(body)))])
        await responder.write(body)

    three[2].upstream.handler = unavailable
    relay = fleet_relay(tmp_path, [t.base_url for t in three], routing=FAST_EJECTION)
    try:
        replies = many(200, lambda n: post(relay, CHAT_BODY, CHAT, {"X-Session-ID": f"k{n}"}))
        assert all(reply.status == 200 for reply in replies)
        # Its share would be ~67: it gets the three that eject it, what was already on its way to it from 16
        # concurrent clients, and a trial per ejection period.
        assert len(three[2].upstream.requests) <= 25
        assert get(relay, "/health/upstreams").json()["upstreams"][2]["state"] in ("ejected", "probing")
    finally:
        relay.stop()


def test_a_hanging_upstream_is_ejected_after_its_read_timeouts(three: list[UpstreamThread], tmp_path: Path) -> None:
    async def hang(request: Recorded, responder: Responder) -> None:
        await responder.wait_closed(30)

    three[0].upstream.handler = hang
    relay = fleet_relay(tmp_path, [t.base_url for t in three], read_timeout=0.5, routing=FAST_EJECTION)
    try:
        first = many(30, lambda n: post(relay, CHAT_BODY, CHAT, {"X-Session-ID": f"k{n}"}), workers=30)
        timeouts = [reply for reply in first if reply.status == 504]
        assert 1 <= len(timeouts) <= 6  # not failed over: the upstream may still be working on them
        assert get(relay, "/health/upstreams").json()["upstreams"][0]["state"] in ("ejected", "probing")
        later = many(30, lambda n: post(relay, CHAT_BODY, CHAT, {"X-Session-ID": f"k{n}"}), workers=4)
        assert sum(reply.status == 200 for reply in later) >= 29
    finally:
        relay.stop()


def test_a_failure_in_the_middle_of_a_body_is_not_failed_over(three: list[UpstreamThread], tmp_path: Path) -> None:
    relay = fleet_relay(tmp_path, [t.base_url for t in three])
    try:
        with connect(relay.port) as sock:
            sock.sendall(post_bytes(CHAT_BODY, headers={"x-fake-fault": "reset-mid-body"}))
            response = read_head(sock)
            _, complete = read_to_end(response)
        assert response.status == 200 and not complete  # cut, as with one upstream
        assert sum(served_by(three)) == 1
    finally:
        relay.stop()


def test_every_worker_sends_a_conversation_to_the_same_upstream(three: list[UpstreamThread], tmp_path: Path) -> None:
    relay = fleet_relay(tmp_path, [t.base_url for t in three], args=("--workers", "2"))
    try:
        for key in (f"conversation-{n}" for n in range(20)):
            for _ in range(6):  # each on a new connection, which either worker may accept
                assert_chat_completion(post(relay, orjson.dumps({"messages": [], "metadata": {"c": key}}), CHAT, {"X-Session-ID": key}))
        homes: dict[str, set[int]] = collections.defaultdict(set)
        for index, thread in enumerate(three):
            for request in thread.upstream.requests:
                homes[request.json()["metadata"]["c"]].add(index)
        assert all(len(where) == 1 for where in homes.values()), homes
        assert len({m.group(1) for m in relay.wait_for_log(r"Started server process \[(\d+)\]", count=2)}) == 2
    finally:
        relay.stop()


def test_the_upstream_is_in_the_access_log_and_the_metrics(three: list[UpstreamThread], tmp_path: Path) -> None:
    relay = fleet_relay(tmp_path, [t.base_url for t in three], access_log="json")
    try:
        for number in range(6):
            assert_chat_completion(post(relay, CHAT_BODY, CHAT, {"X-Session-ID": f"s{number}"}))
        lines = [orjson.loads(match.group(0)) for match in relay.wait_for_log(r'^\{"method".*\}$', count=6)]
        labels = {f"127.0.0.1:{t.port}" for t in three}
        assert {line["upstream"] for line in lines} <= labels
        metrics = get(relay, "/metrics").body.decode()
        for label in labels:
            assert f'relay_fleet_ejected{{upstream="{label}"}} 0.0' in metrics
        answered = sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("relay_fleet_answers_total{"))
        assert answered == 6
        assert 'relay_affinity_total{result="hit"} 6.0' in metrics
        assert MODEL not in "".join(labels)
    finally:
        relay.stop()

