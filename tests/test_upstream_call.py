"""The upstream call on its own (relay.client.Endpoint), against a raw socket server on 127.0.0.1 that
records the exact bytes it receives and answers with canned bytes: the request head the relay writes
itself, and the pieces of aiohttp it leans on (connector.connect with a ClientRequest as the address, a
connection's parser set up by set_response_params, (message, payload) from read()).

Everything else about the relay is tested through a running relay."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
import trustme
from aiohttp.http_exceptions import HttpProcessingError

from relay.client import Endpoint, Upstream
from relay.config import Settings
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

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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


def run(
    answers: list[bytes],
    scenario: Callable[[Endpoint], Awaitable[object]],
    tls: trustme.CA | None = None,
    trusted: bool = True,
    **config: object,
) -> tuple[object, RawServer]:
    """Serve `answers` (over TLS with a certificate from `tls`, if given, which the relay trusts only if
    `trusted`), run `scenario` on an Endpoint for /v1/chat/completions, return its result and the server."""

    async def main() -> object:
        server = RawServer(answers)
        server_side = client_side = None
        if tls is not None:
            server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.issue_cert("127.0.0.1").configure_cert(server_side)
            if trusted:
                client_side = ssl.create_default_context()
                tls.configure_trust(client_side)
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=server_side)
        server.port = port = listener.sockets[0].getsockname()[1]
        scheme = "https" if tls else "http"
        settings = Settings(
            openai_base_url=f"{scheme}://127.0.0.1:{port}/v1", openai_api_key=API_KEY, openai_model=MODEL, **config  # type: ignore[arg-type]
        )
        upstream = Upstream(settings, tls=client_side)
        await upstream.open()
        try:
            result = await asyncio.wait_for(scenario(upstream.endpoint("/chat/completions")), 10)
        finally:
            await upstream.close()
            listener.close()
            await listener.wait_closed()
        return result, server

    return asyncio.run(main())


async def body_of(endpoint: Endpoint, headers: list[tuple[bytes, bytes]] = [], query: bytes = b"") -> tuple[int, bytes]:
    response = await endpoint.post(query, headers, b'{"a":1}')
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
        response = await endpoint.post(b"", [], b"{}")
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
    async def two_posts(endpoint: Endpoint) -> list[tuple[int, bytes]]:
        return [await body_of(endpoint), await body_of(endpoint)]

    answers, server = run([OK, OK], two_posts, tls=trustme.CA())
    assert answers == [(200, b"{}"), (200, b"{}")]
    assert server.connections == 1
    assert [request.partition(b"\r\n")[0] for request in server.requests] == [b"POST /v1/chat/completions HTTP/1.1"] * 2
    assert all(request.endswith(b'\r\n\r\n{"a":1}') for request in server.requests)


def test_https_upstream_whose_certificate_nobody_trusts_is_refused() -> None:
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        run([OK], body_of, tls=trustme.CA(), trusted=False)
