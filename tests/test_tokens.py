"""Token usage, the figure rollout jobs are budgeted in: read from the end of each answer (JSON, a chat
stream's usage chunk, the Responses API's response.completed event) into `relay_tokens_total{endpoint,
kind}` and the access log, without touching a byte the client gets. An answer without usage, or with a
broken one, counts nothing and is relayed as it came."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import orjson
import pytest

from relay.testing import Recorded, Responder, UpstreamThread
from tests.clients import CHAT, RESPONSES, Reply, post, requests_seen, scrape_when_idle
from tests.servers import RelayServer

RelayFactory = Callable[..., RelayServer]
KINDS = ("prompt", "completion", "cached_prompt", "reasoning")


@pytest.fixture(scope="module")
def counting(relay_factory: RelayFactory) -> RelayServer:
    return relay_factory(access_log="json")


def usage_of(reply: Reply) -> dict:
    """The usage the client itself received: the JSON body's, or the last one an SSE stream carried."""
    if reply.header("content-type") == "application/json":
        return reply.json()["usage"]
    found = [json.loads(line[6:]) for line in reply.body.decode().splitlines() if line.startswith("data: {")]
    usages = [event.get("usage") or event.get("response", {}).get("usage") for event in found]
    return [usage for usage in usages if usage][-1]


def expected(usage: dict) -> dict[str, int]:
    prompt_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
    return {
        "prompt": usage.get("prompt_tokens", usage.get("input_tokens")),
        "completion": usage.get("completion_tokens", usage.get("output_tokens")),
        "cached_prompt": prompt_details.get("cached_tokens", 0),
        "reasoning": completion_details.get("reasoning_tokens", 0),
    }


def counted(server: RelayServer, endpoint: str, action: Callable[[], Reply]) -> tuple[Reply, dict[str, float]]:
    before = scrape_when_idle(server)
    reply = action()
    after = scrape_when_idle(server)
    return reply, {kind: after.value("relay_tokens_total", endpoint=endpoint, kind=kind) - before.value("relay_tokens_total", endpoint=endpoint, kind=kind) for kind in KINDS}


def access_line(server: RelayServer, request_id: str) -> dict:
    (line,) = server.wait_for_log(rf'^(\{{"method".*"request_id":"{request_id}".*\}})$')
    return json.loads(line.group(1))


@pytest.mark.parametrize(
    ("target", "body", "endpoint"),
    [
        (CHAT, {"messages": []}, "chat.completions"),
        (CHAT, {"messages": [], "stream": True, "stream_options": {"include_usage": True}}, "chat.completions"),
        (RESPONSES, {"input": "hi"}, "responses"),
        (RESPONSES, {"input": "hi", "stream": True}, "responses"),
    ],
    ids=["chat", "chat-stream", "responses", "responses-stream"],
)
def test_tokens_counted_from_the_answers_usage(counting: RelayServer, target: str, body: dict, endpoint: str) -> None:
    reply, tokens = counted(counting, endpoint, lambda: post(counting, orjson.dumps(body), target, {"x-fake-size": "400"}))
    assert reply.status == 200
    want = expected(usage_of(reply))
    assert want["prompt"] > 0 and want["completion"] > 0
    assert tokens == want
    line = access_line(counting, reply.header("x-request-id"))
    assert (line["prompt_tokens"], line["completion_tokens"], line["cached_tokens"], line["reasoning_tokens"]) == (
        want["prompt"], want["completion"], want["cached_prompt"], want["reasoning"]
    )
    assert line["model"] == "relay-test-model"  # the model sent upstream


def test_a_chat_stream_without_the_usage_chunk_counts_nothing(counting: RelayServer) -> None:
    reply, tokens = counted(counting, "chat.completions", lambda: post(counting, b'{"messages":[],"stream":true}', CHAT))
    assert reply.status == 200 and b'"usage":{' not in reply.body
    assert tokens == dict.fromkeys(KINDS, 0)
    assert access_line(counting, reply.header("x-request-id")).get("prompt_tokens") is None


@pytest.mark.parametrize(
    "body",
    [b'{"object":"chat.completion","usage":{"prompt_tokens":"many"}}', b'{"object":"chat.completion","usage":{"prompt_tokens":3,', b"not json"],
    ids=["wrong-type", "cut-off", "not-json"],
)
def test_a_broken_usage_counts_nothing_and_reaches_the_client_as_sent(
    counting: RelayServer, upstream: UpstreamThread, body: bytes
) -> None:
    async def answer(request: Recorded, responder: Responder) -> None:
        await responder.start(200, [("content-type", "application/json"), ("content-length", str(len(body))), ("x-request-id", "req_broken")])
        await responder.write(body)

    upstream.upstream.handler = answer
    reply, tokens = counted(counting, "chat.completions", lambda: post(counting))
    assert (reply.status, reply.body) == (200, body)
    assert tokens == dict.fromkeys(KINDS, 0)


def test_include_stream_usage_asks_for_the_usage_chunk(relay_factory: RelayFactory, upstream: UpstreamThread) -> None:
    server = relay_factory(include_stream_usage=True)
    reply, tokens = counted(server, "chat.completions", lambda: post(server, b'{"messages":[],"stream":true}', CHAT))
    (seen,) = requests_seen(upstream, 1)
    assert seen.json()["stream_options"] == {"include_usage": True}
    assert re.search(rb'data: \{[^\n]*"choices":\[\][^\n]*"usage":\{', reply.body)  # the client sees one chunk more
    assert tokens["prompt"] > 0 and tokens == expected(usage_of(reply))
    post(server, b'{"messages":[],"stream":true,"stream_options":{"include_usage":false}}', CHAT)
    assert upstream.upstream.requests[-1].json()["stream_options"] == {"include_usage": False}  # the client's word wins
    post(server, b'{"input":"hi","stream":true}', RESPONSES)
    assert "stream_options" not in upstream.upstream.requests[-1].json()  # chat only
