"""Compressed request bodies (`Content-Encoding: gzip` or `deflate`): decompressed, bounded by
max_request_bytes (a zip bomb gets 413), patched and forwarded as plain JSON; any other coding is 415."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable

import pytest

from relay.testing import UpstreamThread
from tests.clients import CHAT, assert_chat_completion, assert_openai_error, header_values, post, requests_seen
from tests.servers import MODEL, RelayServer

RelayFactory = Callable[..., RelayServer]
LIMIT = 64 * 1024
BODY = b'{"messages": [{"role": "user", "content": "' + b"hi " * 100 + b'"}], "seed": 123456789012345678901234567890}'


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    return compressor.compress(data) + compressor.flush()


@pytest.fixture(scope="module")
def small_limit(relay_factory: RelayFactory) -> RelayServer:
    return relay_factory(max_request_bytes=LIMIT)


@pytest.mark.parametrize(
    ("coding", "compress"),
    [("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress), ("deflate", raw_deflate), ("identity", bytes)],
    ids=["gzip", "x-gzip", "deflate-zlib", "deflate-raw", "identity"],
)
def test_compressed_bodies_are_forwarded_patched_and_plain(
    small_limit: RelayServer, upstream: UpstreamThread, coding: str, compress: Callable[[bytes], bytes]
) -> None:
    assert_chat_completion(post(small_limit, compress(BODY), CHAT, {"Content-Encoding": coding}))
    (seen,) = requests_seen(upstream, 1)
    assert header_values(seen, "content-encoding") == []
    forwarded = json.loads(seen.body)
    assert forwarded["model"] == MODEL and forwarded["messages"] == json.loads(BODY)["messages"]
    assert b"123456789012345678901234567890" in seen.body  # exactly, as always


def test_a_zip_bomb_is_413_however_small_it_arrives(small_limit: RelayServer, upstream: UpstreamThread) -> None:
    bomb = gzip.compress(b'{"messages": "' + b"a" * (LIMIT * 64) + b'"}')
    assert len(bomb) < LIMIT // 4
    assert_openai_error(post(small_limit, bomb, CHAT, {"Content-Encoding": "gzip"}), 413, "request_too_large")
    assert upstream.upstream.requests == []


def test_a_broken_compressed_body_is_400(small_limit: RelayServer, upstream: UpstreamThread) -> None:
    for broken in (b"not gzip at all", gzip.compress(BODY)[:-12]):
        assert_openai_error(post(small_limit, broken, CHAT, {"Content-Encoding": "gzip"}), 400, "invalid_json")
    assert upstream.upstream.requests == []


@pytest.mark.parametrize("coding", ["br", "zstd", "gzip, gzip", "compress"])
def test_other_codings_are_415_naming_the_header(small_limit: RelayServer, upstream: UpstreamThread, coding: str) -> None:
    error = assert_openai_error(post(small_limit, BODY, CHAT, {"Content-Encoding": coding}), 415, "unsupported_content_encoding")
    assert "Content-Encoding" in error["message"]
    assert upstream.upstream.requests == []
