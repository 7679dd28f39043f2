"""Byte fidelity with a raw client (aiohttp, no decompression, no automatic headers): the bytes a client
gets through the relay are the bytes the upstream sends, streams arrive event by event, and what the
client sends reaches the upstream intact apart from the model."""

from __future__ import annotations

import asyncio
import gzip
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from relay.testing import Recorded, Responder, UpstreamThread
from tests.clients import requests_seen
from tests.servers import MODEL, RelayServer

TIMEOUT = 30.0
# How long the client waits for one piece of a lock-step stream before calling it held back, and how
# long the upstream waits for the client to confirm one. A relay that buffers fails the test in
# STEP_TIMEOUT seconds; one that does not never comes near it.
STEP_TIMEOUT = 5.0
HANDLER_TIMEOUT = 10.0
JSON = (("Content-Type", "application/json"),)
CHAT = "/chat/completions"
RESPONSES = "/responses"


@dataclass
class Raw:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


def _session() -> aiohttp.ClientSession:
    # No Accept, Accept-Encoding or User-Agent of aiohttp's own: the request carries exactly the test's
    # headers, and a gzip body stays gzip.
    return aiohttp.ClientSession(
        auto_decompress=False,
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent"),
        timeout=aiohttp.ClientTimeout(total=TIMEOUT),
    )


async def _post(url: str, body: bytes, headers: Sequence[tuple[str, str]]) -> Raw:
    async with _session() as session, session.post(url, data=body, headers=CIMultiDict(headers)) as response:
        return Raw(response.status, response.headers, await response.read())


def post(url: str, body: bytes, headers: Sequence[tuple[str, str]] = JSON) -> Raw:
    return asyncio.run(_post(url, body, headers))


def post_both(
    relay: RelayServer, upstream: UpstreamThread, path: str, payload: dict[str, Any],
    headers: Sequence[tuple[str, str]] = JSON,
) -> tuple[Raw, Raw]:
    """The same request through the relay (client model) and direct (configured model, which the fake
    upstream echoes), so equal bodies can only come from a relay that patched and then kept every byte."""
    via_relay = post(relay.api_url + path, orjson.dumps({**payload, "model": "client-model"}), headers)
    direct = post(upstream.base_url + path, orjson.dumps({**payload, "model": MODEL}), headers)
    return via_relay, direct


@pytest.mark.parametrize(
    ("path", "payload", "directives"),
    [
        (CHAT, {"messages": [{"role": "user", "content": "hi"}]}, {}),
        (CHAT, {"messages": [], "stream": True}, {}),
        (CHAT, {"messages": [], "stream": True, "stream_options": {"include_usage": True}}, {"x-fake-events": "50"}),
        (CHAT, {"messages": []}, {"x-fake-size": "300000"}),
        (RESPONSES, {"input": "hi"}, {}),
        (RESPONSES, {"input": "hi", "stream": True}, {"x-fake-size": "70000"}),
    ],
    ids=["chat-json", "chat-sse", "chat-sse-usage", "chat-json-300k", "responses-json", "responses-sse-big-deltas"],
)
def test_body_bytes_identical_to_direct(
    relay: RelayServer, upstream: UpstreamThread, path: str, payload: dict[str, Any], directives: dict[str, str]
) -> None:
    headers = (*JSON, *directives.items())

    via_relay, direct = post_both(relay, upstream, path, payload, headers)

    assert (via_relay.status, direct.status) == (200, 200)
    assert via_relay.body == direct.body
    assert via_relay.headers["content-type"] == direct.headers["content-type"]
    expected_type = "text/event-stream" if payload.get("stream") else "application/json"
    assert via_relay.headers["content-type"] == expected_type


def test_single_8_mib_sse_event_arrives_whole(relay: RelayServer, upstream: UpstreamThread) -> None:
    size = 8 * 1024 * 1024
    headers = (*JSON, ("x-fake-size", str(size)), ("x-fake-events", "1"))

    via_relay, direct = post_both(relay, upstream, CHAT, {"messages": [], "stream": True}, headers)

    assert via_relay.status == 200
    assert via_relay.body == direct.body
    # One event, one line, no split: the kind of line that breaks 128 KiB line readers.
    event, done, end = via_relay.body.split(b"\n\n")
    assert (done, end) == (b"data: [DONE]", b"")
    assert event.startswith(b"data: ") and b"\n" not in event
    assert len(orjson.loads(event[len(b"data: "):])["choices"][0]["delta"]["content"]) == size


def test_16_mib_request_body_reaches_upstream_intact(relay: RelayServer, upstream: UpstreamThread) -> None:
    # Multi-byte characters and JSON escapes, so a re-encoding or a cut would show in the bytes.
    unit = 'h\u00e9llo \u2603 "quoted" \\ \U0001f600 '
    big = unit * (16 * 1024 * 1024 // len(unit.encode()))
    payload = {"messages": [{"role": "user", "content": big}], "x_unknown": {"deep": [1, 2.5, True, None]},
               "seed": 2**63 - 1}

    response = post(relay.api_url + CHAT, orjson.dumps({**payload, "model": "client-model"}))

    assert response.status == 200
    [seen] = requests_seen(upstream, 1)
    assert len(seen.body) > 16 * 1000 * 1000
    assert seen.json() == {**payload, "model": MODEL}
    assert orjson.dumps(big) in seen.body


def test_integers_beyond_64_bits_reach_upstream_exactly(relay: RelayServer, upstream: UpstreamThread) -> None:
    literal = b"123456789012345678901234567890"

    response = post(relay.api_url + CHAT, b'{"messages": [], "seed": %b, "note": "e+ here"}' % literal)

    assert response.status == 200
    [seen] = requests_seen(upstream, 1)
    assert literal in seen.body  # not 1.2345678901234568e+29
    assert seen.json()["model"] == MODEL


@pytest.mark.parametrize("offload", [None, 64], ids=["inline", "helper-process"])
def test_patch_is_the_same_inline_and_in_the_helper_process(
    relay_factory: Callable[..., RelayServer], upstream: UpstreamThread, offload: int | None
) -> None:
    # offload_body_bytes=64 sends every body here through the helper process; both must patch alike.
    relay = relay_factory(offload_body_bytes=offload, extra_body={"temperature": 0.5, "seed": 1})
    literal = b"123456789012345678901234567890"
    body = b'{"model": "x", "messages": [{"role": "user", "content": "%b"}], "seed": %b}' % (b"y" * 100, literal)

    assert post(relay.api_url + CHAT, body).status == 200
    assert post(relay.api_url + CHAT, b'{"messages": [' + b" " * 100 + b"nope").status == 400

    [seen] = requests_seen(upstream, 1)
    assert literal in seen.body
    assert {k: v for k, v in seen.json().items() if k != "seed"} == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "y" * 100}],
        "temperature": 0.5,
    }


def test_query_string_is_kept_as_sent(relay: RelayServer, upstream: UpstreamThread) -> None:
    response = post(relay.api_url + CHAT + "?a=1&b=%20x", b'{"messages": []}')

    assert response.status == 200
    [seen] = requests_seen(upstream, 1)
    assert seen.path == "/v1/chat/completions?a=1&b=%20x"


def test_base_url_with_trailing_slash_maps_without_double_slash(
    relay_factory: Callable[..., RelayServer], upstream: UpstreamThread
) -> None:
    relay = relay_factory(upstream_url=upstream.base_url + "/")

    response = post(relay.api_url + CHAT, b'{"messages": []}')

    assert response.status == 200
    [seen] = requests_seen(upstream, 1)
    assert seen.path == "/v1/chat/completions"


def test_gzip_body_passes_through_compressed(relay: RelayServer, upstream: UpstreamThread) -> None:
    headers = (*JSON, ("Accept-Encoding", "gzip"), ("x-fake-gzip", "1"))

    via_relay, direct = post_both(relay, upstream, CHAT, {"messages": []}, headers)

    assert via_relay.status == 200
    assert via_relay.headers["content-encoding"] == "gzip"
    assert via_relay.body == direct.body
    assert orjson.loads(gzip.decompress(via_relay.body))["model"] == MODEL
    relayed, _ = requests_seen(upstream, 2)
    assert relayed.header("accept-encoding") == "gzip"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_no_accept_encoding_added_when_client_sent_none(
    relay: RelayServer, upstream: UpstreamThread, stream: bool
) -> None:
    response = post(relay.api_url + CHAT, orjson.dumps({"messages": [], "stream": stream}))

    assert response.status == 200
    assert "content-encoding" not in response.headers
    [seen] = requests_seen(upstream, 1)
    # Nor any other header of aiohttp's own (it adds Accept and User-Agent where a request has none).
    for header in ("accept-encoding", "accept", "user-agent"):
        assert seen.header(header) is None, header


# --- no buffering, proved by lock step ------------------------------------------------------------


def lock_step_handler(
    pieces: Sequence[bytes], received: Sequence[threading.Event], content_type: str, stalls: list[int]
) -> Callable[[Recorded, Responder], Any]:
    """Send piece k+1 only once the client has confirmed piece k: a relay that holds bytes back until
    more arrive, or until the end, can never deliver piece k, so the exchange cannot progress."""

    async def handler(request: Recorded, responder: Responder) -> None:
        await responder.start(200, [("Content-Type", content_type), ("Transfer-Encoding", "chunked")])
        for index, (piece, seen) in enumerate(zip(pieces, received, strict=True)):
            await responder.chunk(piece)
            if not await responder.wait(seen, HANDLER_TIMEOUT):
                stalls.append(index)
                responder.abort()
                return
        await responder.end_chunks()

    return handler


async def read_in_lock_step(
    url: str, body: bytes, pieces: Sequence[bytes], received: Sequence[threading.Event]
) -> bytes:
    async with _session() as session, session.post(url, data=body, headers=CIMultiDict(JSON)) as response:
        assert response.status == 200
        got = b""
        expected = b""
        for index, (piece, seen) in enumerate(zip(pieces, received, strict=True)):
            expected += piece
            while len(got) < len(expected):
                try:
                    chunk = await asyncio.wait_for(response.content.readany(), STEP_TIMEOUT)
                except TimeoutError:
                    pytest.fail(f"piece {index} never reached the client: the relay is holding bytes back")
                assert chunk, f"the body ended before piece {index}"
                got += chunk
            # Exactly up to piece k: the upstream has not sent more, so nothing else can be here.
            assert got == expected
            seen.set()
        return got + await asyncio.wait_for(response.read(), STEP_TIMEOUT)


def _sse_pieces(count: int) -> list[bytes]:
    return [b'data: {"index": %d, "delta": "piece %d"}\n\n' % (i, i) for i in range(count)] + [b"data: [DONE]\n\n"]


def _json_pieces(count: int) -> list[bytes]:
    return [b'{"id": "lock-step", "parts": ['] + [b'"part %d", ' % i for i in range(count)] + [b'"last"]}']


@pytest.mark.parametrize(
    ("stream", "content_type", "make_pieces"),
    [(True, "text/event-stream", _sse_pieces), (False, "application/json", _json_pieces)],
    ids=["sse", "chunked-json"],
)
@pytest.mark.parametrize("path", [CHAT, RESPONSES], ids=["chat", "responses"])
def test_each_piece_is_relayed_before_the_next_is_sent(
    relay: RelayServer, upstream: UpstreamThread, path: str, stream: bool, content_type: str,
    make_pieces: Callable[[int], list[bytes]],
) -> None:
    pieces = make_pieces(10)
    received = [threading.Event() for _ in pieces]
    stalls: list[int] = []
    upstream.upstream.handler = lock_step_handler(pieces, received, content_type, stalls)
    try:
        body = asyncio.run(read_in_lock_step(relay.api_url + path, orjson.dumps({"stream": stream}), pieces, received))
    finally:
        for seen in received:  # release the handler at once if the client gave up
            seen.set()

    assert body == b"".join(pieces)
    assert stalls == []
    if not stream:
        assert orjson.loads(body)["parts"][-1] == "last"
    [seen_request] = requests_seen(upstream, 1)
    assert seen_request.json()["model"] == MODEL


# --- the response head is not held back behind the body -----------------------------------------------

LATE = b'{"late":true}'


@pytest.mark.parametrize("chunked", [True, False], ids=["sse-chunked", "json-content-length"])
def test_head_reaches_the_client_before_the_first_body_byte_exists(
    relay: RelayServer, upstream: UpstreamThread, chunked: bool
) -> None:
    # relay.protocol holds a head back to send it with the body, but only for the rest of an event-loop
    # step: an upstream that thinks before its first byte of body must not keep its status from the client.
    head_seen = threading.Event()
    stalls: list[int] = []

    async def head_then_wait(request: Recorded, responder: Responder) -> None:
        framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(len(LATE)))
        await responder.start(200, [("Content-Type", "text/event-stream" if chunked else "application/json"), framing])
        if not await responder.wait(head_seen, HANDLER_TIMEOUT):
            stalls.append(0)
            responder.abort()
            return
        if chunked:
            await responder.chunk(LATE)
            await responder.end_chunks()
        else:
            await responder.write(LATE)

    async def client() -> bytes:
        async with _session() as session:
            try:  # aiohttp's post returns as soon as the head is in
                response = await asyncio.wait_for(
                    session.post(relay.api_url + CHAT, data=b"{}", headers=CIMultiDict(JSON)), STEP_TIMEOUT
                )
            except TimeoutError:
                pytest.fail("the response head was held back until the body came")
            async with response:
                assert response.status == 200
                head_seen.set()
                return await asyncio.wait_for(response.read(), STEP_TIMEOUT)

    upstream.upstream.handler = head_then_wait
    try:
        body = asyncio.run(client())
    finally:
        head_seen.set()  # release the handler at once if the client gave up
    assert stalls == []
    assert body == LATE
