"""The active health probe (relay.probe) through aiohttp's public client, against a fake upstream on a
loopback port (aioresponses, which would mock the client, does not work with aiohttp 3.14: its fake
ClientResponse lacks the `stream_writer` 3.14 requires): what counts as up, what as a failure, and that
an ejected upstream comes back on a good probe."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest

from relay.fleet import Member
from relay.health import Health
from relay.probe import probe
from relay.settings import Settings
from relay.testing import Recorded, Responder, UpstreamThread, free_port
from relay.upstream import Upstream


@pytest.fixture(scope="module")
def answering() -> Iterator[UpstreamThread]:
    thread = UpstreamThread().start()
    yield thread
    thread.stop()


def member(base: str, eject_after: int = 2) -> Member:
    settings = Settings(openai_base_url=base, openai_api_key="sk-probe", openai_model="m")
    return Member(Upstream(base, "sk-probe", settings), {}, Health(eject_after, 2.0, 60.0), None, 1)


def answers(thread: UpstreamThread, status: int) -> None:
    async def handler(request: Recorded, responder: Responder) -> None:
        await responder.start(status, [("content-length", "0")])

    thread.upstream.reset()
    thread.upstream.handler = handler


def probe_once(target: Member) -> bool:
    async def run() -> bool:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            return await probe(session, target, "/models")

    return asyncio.run(run())


def test_an_answer_below_500_is_up_even_a_404(answering: UpstreamThread) -> None:
    for status in (200, 401, 404):
        answers(answering, status)
        target = member(answering.base_url)
        assert probe_once(target) and target.probed is True and target.health.failures == 0
    (seen,) = answering.upstream.requests
    assert (seen.method, seen.path, seen.header("authorization")) == ("GET", "/v1/models", "Bearer sk-probe")


def test_no_answer_or_a_5xx_counts_as_a_failure_and_ejects(answering: UpstreamThread) -> None:
    answers(answering, 503)
    target = member(answering.base_url, eject_after=2)
    assert not probe_once(target)
    assert target.health.state == "healthy" and target.health.failures == 1
    target.upstream.base_url = f"http://127.0.0.1:{free_port()}/v1"  # nobody listens: refused
    assert not probe_once(target)
    assert target.health.state == "ejected" and target.probed is False


def test_a_good_probe_brings_an_ejected_upstream_back(answering: UpstreamThread) -> None:
    answers(answering, 500)
    target = member(answering.base_url, eject_after=1)
    probe_once(target)
    assert target.health.state == "ejected"
    answers(answering, 200)
    assert probe_once(target)
    assert target.health.state == "healthy" and target.health.ejected_for() == 0
