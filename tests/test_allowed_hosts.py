"""DNS rebinding: the relay answers only the Host names it was told about (`allowed_hosts`; by default
the loopback names and the bind host, any port; IP literals always), on every route, and refuses a web
page of another origin (Origin) on the API routes. A refused request never reaches the upstream."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from relay.testing import UpstreamThread
from tests.clients import CHAT, CHAT_BODY, Reply, assert_chat_completion, assert_openai_error, exchange, request_head, scrape
from tests.servers import RelayServer

RelayFactory = Callable[..., RelayServer]
ROUTES = [("POST", CHAT), ("POST", "/v1/responses"), ("GET", "/v1/models"), ("GET", "/v1/models/x"), ("GET", "/health"), ("GET", "/"), ("GET", "/metrics")]


def send(server: RelayServer, method: str, target: str, host: str, headers: dict[str, str] | None = None) -> Reply:
    body = CHAT_BODY if method == "POST" else b""
    extra = {"Content-Type": "application/json", **(headers or {})} if method == "POST" else dict(headers or {})
    raw = request_head(method, target, extra, len(body) if method == "POST" else None).replace(
        b"Host: 127.0.0.1\r\n", f"Host: {host}\r\n".encode(), 1
    )
    return exchange(server.port, raw + body)


@pytest.mark.parametrize(("method", "target"), ROUTES)
def test_a_foreign_host_is_refused_on_every_route(relay: RelayServer, upstream: UpstreamThread, method: str, target: str) -> None:
    before = scrape(relay).value("relay_refused_total", reason="invalid_host")
    for host in ("evil.example", f"evil.example:{relay.port}", "localhost.evil.example"):
        reply = send(relay, method, target, host)
        assert_openai_error(reply, 400, "invalid_host")
        assert reply.header("connection") == "close"
    assert upstream.upstream.requests == []
    assert scrape(relay).value("relay_refused_total", reason="invalid_host") - before == 3


@pytest.mark.parametrize("host", ["localhost", "LocalHost:8000", "127.0.0.1", "127.0.0.1:1", "[::1]", "[::1]:8000", "10.20.30.40:8000"])
def test_loopback_names_and_ip_literals_pass_with_or_without_port(relay: RelayServer, host: str) -> None:
    assert_chat_completion(send(relay, "POST", CHAT, host))


def test_configured_names_replace_the_default(relay_factory: RelayFactory) -> None:
    server = relay_factory(allowed_hosts=["relay.internal", "*.rollouts.example"])
    assert_chat_completion(send(server, "POST", CHAT, "relay.internal:9000"))
    assert_chat_completion(send(server, "POST", CHAT, "worker-7.rollouts.example"))
    assert_chat_completion(send(server, "POST", CHAT, "127.0.0.1"))  # an address: never a rebinding
    assert_openai_error(send(server, "POST", CHAT, "localhost"), 400, "invalid_host")


def test_star_answers_any_host_and_any_origin(relay_factory: RelayFactory) -> None:
    server = relay_factory(allowed_hosts=["*"])
    assert_chat_completion(send(server, "POST", CHAT, "anything.example"))
    assert_chat_completion(send(server, "POST", CHAT, "127.0.0.1", {"Origin": "https://anything.example"}))


def test_a_named_bind_host_is_allowed(relay_factory: RelayFactory) -> None:
    server = relay_factory(args=("--host", "localhost"))
    assert_chat_completion(send(server, "POST", CHAT, "localhost"))
    assert_openai_error(send(server, "POST", CHAT, "evil.example"), 400, "invalid_host")


@pytest.mark.parametrize("origin", ["https://evil.example", "http://evil.example:8000", "null"])
def test_a_web_page_of_another_origin_cannot_post(relay: RelayServer, upstream: UpstreamThread, origin: str) -> None:
    # What a page at evil.example can send to http://127.0.0.1:8000 without rebinding (a no-cors POST).
    before = scrape(relay).value("relay_refused_total", reason="invalid_origin")
    reply = send(relay, "POST", CHAT, "127.0.0.1", {"Origin": origin})
    assert_openai_error(reply, 403, "invalid_origin")
    assert upstream.upstream.requests == []
    assert scrape(relay).value("relay_refused_total", reason="invalid_origin") - before == 1


def test_a_page_served_from_an_allowed_origin_may_post(relay: RelayServer) -> None:
    assert_chat_completion(send(relay, "POST", CHAT, "127.0.0.1", {"Origin": "http://localhost:3000"}))
