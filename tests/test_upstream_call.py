"""The upstream call on its own (relay.upstream.Endpoint), against a raw socket server on 127.0.0.1 that
records the exact bytes it receives and answers with canned bytes: the request head the relay writes
itself, and the pieces of aiohttp it leans on (connector.connect with a ClientRequest as the address, a
connection's parser set up by set_response_params, (message, payload) from read()).

Everything else about the relay is tested through a running relay."""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
import trustme
import uvloop
from aiohttp.http_exceptions import HttpProcessingError

from relay.settings import Settings
from relay.upstream import Endpoint, Response, Unanswered, Upstream
from tests.servers import API_KEY, MODEL

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class RawServer:
    """Accepts connections; for each request (read up to the end of its Content-Length body) writes the
    next canned answer. Records every request's bytes and how many connections it saw."""

    def __init__(self, answers: list[bytes]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self.connections = 0
        self.port = 0

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
                self.requests.append(head + await reader.readexactly(length))
                writer.write(self.answers.pop(0))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run(
    answers: list[bytes],
    scenario: Callable[[Endpoint], Awaitable[object]],
    tls: trustme.CA | None = None,
    trusted: bool = True,
    handler: Callable[[RawServer], Handler] | None = None,
    **config: object,
) -> tuple[object, RawServer]:
    """Serve `answers` (over TLS with a certificate from `tls`, if given, which the relay trusts only if
    `trusted`; or as `handler(server)` does), run `scenario` on an Endpoint for /v1/chat/completions,
    return its result and the server."""

    async def main() -> object:
        server = RawServer(answers)
        server_side = client_side = None
        if tls is not None:
            server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.issue_cert("127.0.0.1").configure_cert(server_side)
            if trusted:
                client_side = ssl.create_default_context()
                tls.configure_trust(client_side)
        listener = await asyncio.start_server(handler(server) if handler else server.answer, "127.0.0.1", 0, ssl=server_side)
        server.port = port = listener.sockets[0].getsockname()[1]
        scheme = "https" if tls else "http"
        settings = Settings(
            openai_base_url=f"{scheme}://127.0.0.1:{port}/v1", openai_api_key=API_KEY, openai_model=MODEL, **config  # type: ignore[arg-type]
        )
        upstream = Upstream(settings.openai_base_url, settings.openai_api_key, settings, tls=client_side)
        await upstream.open()
        try:
            result = await asyncio.wait_for(scenario(upstream.endpoint("/chat/completions")), 10)
        finally:
            await upstream.close()
            listener.close()
            await listener.wait_closed()
        return result, server

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # the loop `relay serve` runs on
        return runner.run(main())


async def send(endpoint: Endpoint, body: bytes, headers: list[tuple[bytes, bytes]] = [], query: bytes = b"") -> Response:
    """One attempt, as the relay makes it; a failure raises what ended it."""
    try:
        return await endpoint.post(query, headers, body, False, lambda: None)
    except Unanswered as failed:
        raise failed.cause from None


async def body_of(endpoint: Endpoint, headers: list[tuple[bytes, bytes]] = [], query: bytes = b"") -> tuple[int, bytes]:
    response = await send(endpoint, b'{"a":1}', headers, query)
    try:
        return response.status, await response.content.read()
    finally:
        response.release()


def test_request_head_is_the_configured_credentials_then_the_clients_headers() -> None:
    client = [(b"x-client", b"a\xc3\xa9"), (b"x-team", b"from-client")]
    defaults = {"OpenAI-Organization": "org-cfg", "X-Team": "from-config"}
    (status, body), server = run([OK], lambda endpoint: body_of(endpoint, client, b"api-version=2"), openai_default_headers=defaults)
    assert (status, body) == (200, b"{}")
    (request,) = server.requests
    head, _, sent_body = request.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions?api-version=2 HTTP/1.1"
    assert lines[1:] == [
        b"Host: 127.0.0.1:%d" % server.port,
        f"Authorization: Bearer {API_KEY}".encode(),
        b"Content-Type: application/json",
        b"OpenAI-Organization: org-cfg",  # X-Team: the client's value replaced the configured one
        b"x-client: a\xc3\xa9",  # bytes as the client sent them
        b"x-team: from-client",
        b"Content-Length: 7",
    ]
    assert sent_body == b'{"a":1}'


def test_informational_answers_are_skipped() -> None:
    early = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n"
    (status, body), _ = run([early + OK], body_of)
    assert (status, body) == (200, b"{}")


def test_released_connection_is_reused_and_closed_one_is_not() -> None:
    async def three_posts(endpoint: Endpoint) -> list[int]:
        statuses = [(await body_of(endpoint))[0], (await body_of(endpoint))[0]]  # released after each
        response = await send(endpoint, b"{}")
        response.close()  # dropped, unread
        statuses.append((await body_of(endpoint))[0])
        return statuses + [response.status]

    statuses, server = run([OK] * 4, three_posts)
    assert statuses == [200, 200, 200, 200]
    assert server.connections == 2


def test_malformed_answer_raises_the_parsers_error() -> None:
    with pytest.raises(HttpProcessingError):
        run([b"HTTP/1.1 two hundred OK\r\n\r\n"], body_of)


def test_https_upstream_gets_the_same_request_and_answers_over_one_kept_connection() -> None:
    # api.openai.com is HTTPS: head and body go through the TLS transport that the connector made.
    answers, server = run([OK, OK], _twice, tls=trustme.CA())
    assert answers == [(200, b"{}"), (200, b"{}")]
    assert server.connections == 1
    assert [request.partition(b"\r\n")[0] for request in server.requests] == [b"POST /v1/chat/completions HTTP/1.1"] * 2
    assert all(request.endswith(b'\r\n\r\n{"a":1}') for request in server.requests)


def test_https_upstream_whose_certificate_nobody_trusts_is_refused() -> None:
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        run([OK], body_of, tls=trustme.CA(), trusted=False)


def test_pooled_connection_with_an_unsolicited_answer_is_not_reused() -> None:
    # An upstream may write on an idle kept-alive connection (a 408 before closing it, a late answer):
    # a request sent on it would read that instead of its own answer.
    stray_sent = asyncio.Event()

    def stray_while_pooled(server: RawServer) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            server.connections += 1
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(7)
            writer.write(OK if server.connections == 1 else OK.replace(b"{}", b"[]"))
            await writer.drain()
            if server.connections == 1:
                await asyncio.sleep(0.2)  # the relay has pooled the connection by now
                writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                stray_sent.set()
                await asyncio.sleep(5)

        return handle

    async def twice_with_a_pause(endpoint: Endpoint) -> list[tuple[int, bytes]]:
        first = await body_of(endpoint)
        await stray_sent.wait()
        await asyncio.sleep(0.2)  # for the stray answer to reach the pooled connection's parser
        return [first, await body_of(endpoint)]

    answers, server = run([], twice_with_a_pause, handler=stray_while_pooled)
    assert answers == [(200, b"{}"), (200, b"[]")]
    assert server.connections == 2


@pytest.mark.parametrize("tls", [None, trustme.CA()], ids=["http", "https"])
def test_connection_with_request_body_still_unsent_is_not_reused(tls: trustme.CA | None) -> None:
    # The upstream answers before reading a big body (413, say) and keeps the connection: pooled, the
    # rest of that body would stand in front of the next request. (Under TLS the unsent part is not
    # visible in the socket's buffer: the answer and the body's size tell.)
    def early_answer(server: RawServer) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            server.connections += 1
            head = await reader.readuntil(b"\r\n\r\n")
            server.requests.append(head)
            if b"Content-Length: 2\r\n" in head:  # the small second request
                await reader.readexactly(2)
                writer.write(OK)
            else:
                writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
            await asyncio.sleep(5)  # reads nothing more for now, keeps the connection
            writer.close()

        return handle

    async def big_then_small(endpoint: Endpoint) -> list[int]:
        big = await send(endpoint, b"x" * (32 << 20))
        await big.content.read()
        big.release()
        small = await send(endpoint, b"{}")
        await small.content.read()
        small.release()
        return [big.status, small.status]

    statuses, server = run([], big_then_small, tls=tls, handler=early_answer)
    assert statuses == [413, 200]
    assert server.connections == 2


def test_body_broken_by_a_malformed_chunk_fails_instead_of_waiting() -> None:
    # aiohttp's parser fails the connection, not the body it was streaming: without relay.upstream's own
    # watch the body would wait for bytes that never come, holding its client until read_timeout.
    def bad_chunk(server: RawServer) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(b"zz\r\nnot a chunk\r\n")
            await asyncio.sleep(20)  # and keeps the connection open, as a broken proxy might

        return handle

    async def read_all(endpoint: Endpoint) -> bytes:
        response = await send(endpoint, b"{}")
        try:
            got = await response.content.readany()
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.content.readany()
            return got
        finally:
            response.close()

    got, _ = run([], read_all, handler=bad_chunk)
    assert got == b"hello"


async def _twice(endpoint: Endpoint) -> list[tuple[int, bytes]]:
    return [await body_of(endpoint), await body_of(endpoint)]


def test_upstream_that_speaks_first_fails_the_request_once() -> None:
    # A base URL that points at a server which talks before it is asked (an SSH port, say): the new
    # connection's first bytes are not an answer to anything. One connection, one error; no retry loop.
    def banner(server: RawServer) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            server.connections += 1
            writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
            await writer.drain()
            await asyncio.sleep(5)

        return handle

    async def one_post(endpoint: Endpoint) -> str:
        await asyncio.sleep(0.1)  # the banner arrives before the request goes out
        try:
            await body_of(endpoint)
        except HttpProcessingError as exc:
            return type(exc).__name__
        return "answered"

    outcome, server = run([], one_post, handler=banner)
    assert outcome != "answered"
    assert server.connections == 1


def test_connection_lost_in_the_pool_leaves_no_unretrieved_error() -> None:
    # relay.upstream watches each connection's `closed` future; one that breaks while pooled must not
    # leave asyncio reporting "Future exception was never retrieved".
    def reset_when_idle(server: RawServer) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            server.connections += 1
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(7)
            writer.write(OK)
            await writer.drain()
            await asyncio.sleep(0.1)
            if server.connections > 1:
                return
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # RST: the pooled connection is lost with an error

        return handle

    async def post_then_wait(endpoint: Endpoint) -> list[dict[str, object]]:
        reported: list[dict[str, object]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        await body_of(endpoint)
        await asyncio.sleep(0.5)  # the reset reaches the pooled connection
        await body_of(endpoint)  # the pool drops the broken one and connects anew
        gc.collect()
        await asyncio.sleep(0)
        return reported

    reported, _ = run([], post_then_wait, handler=reset_when_idle)
    assert [context["message"] for context in reported if "never retrieved" in str(context["message"])] == []
