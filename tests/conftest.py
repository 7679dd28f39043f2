"""Fixtures. Real sockets only: the relay runs as a real `relay serve` process (tests/servers.py) in front of
the fake OpenAI upstream of relay/testing, which runs in a thread of the test process so each test can
script it and read what it received."""

from __future__ import annotations

import os
import itertools
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from relay.testing import UpstreamThread
from tests.redis_server import RedisServer
from tests.servers import RELAY_SERVE, RelayServer, start_relay


@pytest.fixture(scope="session")
def upstream() -> Iterator[UpstreamThread]:
    with UpstreamThread() as thread:
        yield thread


@pytest.fixture(autouse=True)
def _fresh_upstream(request: pytest.FixtureRequest) -> None:
    """Each test starts with an upstream that remembers nothing and answers by its default rules."""
    if "upstream" in request.fixturenames:
        request.getfixturevalue("upstream").upstream.reset()


@pytest.fixture
def started() -> Iterator[list[RelayServer]]:
    """Relays a test starts itself; stopped when it ends, pass or fail."""
    servers: list[RelayServer] = []
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def relay_factory(
    upstream: UpstreamThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RelayServer]]:
    """make(**config_overrides) -> a running relay; the same overrides share one process per session."""
    servers: dict[str, RelayServer] = {}

    def make(
        *,
        upstream_url: str | None = None,
        args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
        launcher: str = RELAY_SERVE,
        **overrides: Any,
    ) -> RelayServer:
        target = upstream_url or upstream.base_url
        environment = sorted((env or {}).items())
        key = repr((target, args, environment, launcher, sorted(overrides.items(), key=lambda kv: kv[0])))
        server = servers.get(key)
        if server is None or server.process.poll() is not None:
            directory = tmp_path_factory.mktemp("relay")
            server = start_relay(directory, target, args=args, env=env, launcher=launcher, **overrides)
            servers[key] = server
        return server

    yield make
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="session")
def relay(relay_factory: Callable[..., RelayServer]) -> RelayServer:
    """The relay with the seed configuration (no extra_body, no cap) in front of the fake upstream."""
    return relay_factory()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; each test names its own cluster, so their keys never meet."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def spawn_relay(tmp_path: Path, upstream: UpstreamThread) -> Iterator[Callable[..., RelayServer]]:
    """spawn_relay(**config) -> a relay of this test alone, stopped by PID when the test ends."""
    started: list[RelayServer] = []
    counter = itertools.count()

    def make(*, args: tuple[str, ...] = (), **overrides: Any) -> RelayServer:
        server = start_relay(tmp_path / f"relay-{next(counter)}", upstream.base_url, args=args, **overrides)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(autouse=True, scope="session")
def _no_proxy_from_environment() -> None:
    # Tests talk to 127.0.0.1 only; a proxy variable in CI's environment must not reroute them.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        os.environ.pop(name, None)
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
