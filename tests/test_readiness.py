"""/readyz means "this relay can serve": 503 in the OpenAI shape, naming each upstream's state, once its
upstreams have failed to connect `eject_after` times in a row (or fail the optional active probe), and
200 again once one can be tried; /livez, /health and / keep saying the process is up."""

from __future__ import annotations

import time
from pathlib import Path

from relay.testing import UpstreamThread, free_port
from tests.clients import assert_openai_error, get, post
from tests.servers import start_relay

FAST = {"eject_after": 3, "eject_seconds": 0.5, "max_eject_seconds": 1}


def until_status(relay: object, target: str, status: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while get(relay, target).status != status:  # type: ignore[arg-type]
        assert time.monotonic() < deadline, f"{target} never answered {status}"
        time.sleep(0.05)


def test_readiness_follows_failures_to_connect_and_recovers(tmp_path: Path) -> None:
    port = free_port()
    relay = start_relay(tmp_path, f"http://127.0.0.1:{port}/v1", routing=FAST)
    try:
        assert get(relay, "/readyz").status == 200  # nothing has failed yet
        for _ in range(3):
            assert_openai_error(post(relay), 502, "upstream_unreachable")
        error = assert_openai_error(get(relay, "/readyz"), 503, "upstream_unavailable")
        assert f"127.0.0.1:{port} ejected" in error["message"] and "refused" in error["message"]
        for live in ("/livez", "/health", "/healthz", "/"):
            assert get(relay, live).status == 200  # liveness: the process is up
        revived = UpstreamThread(port=port).start()
        try:
            until_status(relay, "/readyz", 200)  # due for a trial: ready again
            assert post(relay).status == 200
            assert get(relay, "/health/upstreams").json()["upstreams"][0]["state"] == "healthy"
        finally:
            revived.stop()
    finally:
        relay.stop()


def test_the_active_probe_makes_readiness_fail_without_any_request(tmp_path: Path) -> None:
    port = free_port()
    relay = start_relay(tmp_path, f"http://127.0.0.1:{port}/v1", routing={**FAST, "probe_interval": 0.2})
    try:
        until_status(relay, "/readyz", 503)
        revived = UpstreamThread(port=port).start()  # it answers GET /v1/models with 404: up
        try:
            until_status(relay, "/readyz", 200)
            assert get(relay, "/health/upstreams").json()["upstreams"][0]["probe_ok"] is True
        finally:
            revived.stop()
    finally:
        relay.stop()
