"""What the relay writes about itself: the access log (`access_log: plain | json`, one line per request,
off by default), request bodies at debug level with the API key redacted (`log_bodies`), the Server-Timing
header (`timing_header`), and the open-file limit it runs with.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from relay.testing import UpstreamThread
from tests.clients import (
    CHAT,
    CHAT_BODY,
    RESPONSES,
    RESPONSES_BODY,
    STREAM_BODY,
    assert_chat_completion,
    get,
    post,
)
from tests.servers import API_KEY, ROOT, RelayServer, free_port, start_relay, wait_healthy, write_config

RelayFactory = Callable[..., RelayServer]
# Each format's relay, with the other options of this file spread over them.
CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {"access_log": "plain", "timing_header": True},
    "json": {"access_log": "json", "log_bodies": True, "args": ("--log-level", "debug")},
}
# An access line is the record and nothing else (no level prefix), so a log shipper reads it as it is.
ACCESS_LINE = {"plain": r"^(method=\S+ path=.*)$", "json": r'^(\{"method":.*\})$'}
FIELDS = (
    "method", "path", "status", "upstream_status", "duration_ms", "ttfb_ms", "bytes_in", "bytes_out", "request_id"
)  # fmt: skip
TIMING = re.compile(r"^relay;dur=(\d+(?:\.\d+)?), upstream;dur=(\d+(?:\.\d+)?)$")


def access_lines(server: RelayServer, log_format: str) -> list[dict[str, Any]]:
    """The access log so far, one dict per line: JSON as parsed, plain as key=value strings."""
    lines = [match.group(1) for match in re.finditer(ACCESS_LINE[log_format], server.log(), re.MULTILINE)]
    if log_format == "json":
        return [json.loads(line) for line in lines]
    return [dict(pair.split("=", 1) for pair in line.split(" ")) for line in lines]


def as_text(value: Any) -> str | None:
    """A JSON field as the plain format writes it (which leaves a null field out)."""
    return None if value is None else str(value)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def logged(request: pytest.FixtureRequest, relay_factory: RelayFactory) -> tuple[str, RelayServer]:
    return request.param, relay_factory(**CONFIGS[request.param])


def test_access_log_has_one_line_per_request(logged: tuple[str, RelayServer], upstream: UpstreamThread) -> None:
    log_format, server = logged
    already = len(access_lines(server, log_format))
    sent = [(CHAT_BODY, CHAT, {}), (STREAM_BODY, CHAT, {}), (RESPONSES_BODY, RESPONSES, {"x-fake-status": "429"})]
    replies = [post(server, body, target, headers) for body, target, headers in sent]
    refused = post(server, b"{nope")  # answered by the relay itself: no upstream, no request id
    assert [reply.status for reply in replies] == [200, 200, 429] and refused.status == 400

    server.wait_for_log(ACCESS_LINE[log_format], count=already + 4)
    lines = access_lines(server, log_format)
    assert len(lines) == already + 4, lines[already:]
    by_id = {line.get("request_id"): line for line in lines[already:]}
    for (body, target, _), reply in zip(sent, replies):
        request_id = reply.header("x-request-id")
        assert request_id and request_id in by_id, (request_id, lines[already:])
        line = {key: as_text(value) for key, value in by_id[request_id].items()}
        expected = {"method": "POST", "path": target, "status": str(reply.status), "upstream_status": str(reply.status)}
        assert {key: line[key] for key in expected} == expected
        assert (line["bytes_in"], line["bytes_out"]) == (str(len(body)), str(len(reply.body)))
        # Both durations are numbers, and the whole request took at least as long as its first byte.
        assert float(line["duration_ms"]) >= float(line["ttfb_ms"]) >= 0
    own = {key: as_text(value) for key, value in by_id[None].items()}
    assert (own["status"], own["bytes_in"], own.get("upstream_status"), own.get("ttfb_ms")) == (
        "400", str(len(b"{nope")), None, None
    )
    # JSON writes every field (null included) with its type; plain leaves out the ones without a value.
    if log_format == "json":
        assert all(set(FIELDS) <= set(line) for line in lines[already:])
        assert all(isinstance(line["status"], int) and isinstance(line["duration_ms"], float) for line in lines[already:])
    else:
        assert all(set(FIELDS) <= set(line) for line in lines[already:] if line.get("request_id"))
    assert API_KEY not in server.log()


def test_access_log_is_off_by_default(relay: RelayServer) -> None:
    reply = post(relay)
    assert_chat_completion(reply)
    request_id = reply.header("x-request-id")
    assert request_id
    # The relay logs a request just after answering it; once it has answered another one on its single
    # event loop, anything it was going to log about the first is in the file.
    assert get(relay, "/health").status == 200
    log = relay.log()
    assert request_id not in log
    assert not re.search(ACCESS_LINE["plain"], log, re.MULTILINE)
    assert not re.search(ACCESS_LINE["json"], log, re.MULTILINE)


def test_logged_body_has_the_api_key_redacted(relay_factory: RelayFactory) -> None:
    server = relay_factory(**CONFIGS["json"])
    # A client that pastes the relay's own key into its prompt: the key must not reach the log that way.
    content = f"marker-7d41 my key is {API_KEY} ok"
    body = json.dumps({"messages": [{"role": "user", "content": content}]}).encode()
    assert_chat_completion(post(server, body))
    (logged_body,) = server.wait_for_log(r"request body to /v1/chat/completions: (.*marker-7d41.*)$")
    assert "marker-7d41 my key is [redacted] ok" in logged_body.group(1)
    assert API_KEY not in server.log()


def test_logged_body_has_every_key_redacted(relay_factory: RelayFactory, upstream: UpstreamThread) -> None:
    client_key, other_key = "relay-client-key-5c1e", "sk-second-upstream-9f3a"
    second = {"url": f"http://127.0.0.1:{free_port()}/v1", "api_key": other_key}  # nothing listens: failed over
    server = relay_factory(**CONFIGS["json"], relay_api_keys=[client_key], openai_base_url=[upstream.base_url, second])
    content = f"marker-51b0 {API_KEY} {client_key} {other_key} ok"
    body = json.dumps({"messages": [{"role": "user", "content": content}]}).encode()
    assert_chat_completion(post(server, body, headers={"Authorization": f"Bearer {client_key}"}))
    (logged_body,) = server.wait_for_log(r"request body to /v1/chat/completions: (.*marker-51b0.*)$")
    assert "marker-51b0 [redacted] [redacted] [redacted] ok" in logged_body.group(1)
    assert not any(key in server.log() for key in (API_KEY, client_key, other_key))


def test_bodies_are_not_logged_without_log_bodies(relay_factory: RelayFactory) -> None:
    server = relay_factory(**CONFIGS["plain"])
    assert_chat_completion(post(server, b'{"messages":[{"role":"user","content":"marker-55c0"}]}'))
    server.wait_for_log(r"^method=POST")  # the request was logged, only not its body
    assert "marker-55c0" not in server.log()


def test_server_timing_header(relay_factory: RelayFactory) -> None:
    server = relay_factory(**CONFIGS["plain"])
    for body in (CHAT_BODY, STREAM_BODY):
        # The upstream waits 200 ms before its headers: that much is the upstream's share, not the relay's.
        reply = post(server, body, headers={"x-fake-delay-ms": "200"})
        assert reply.status == 200
        timing = TIMING.match(reply.header("server-timing") or "")
        assert timing, reply.header("server-timing")
        assert float(timing.group(2)) >= 190, timing.group(0)  # a little allowance for timer granularity
        assert len(reply.headers.get_all("server-timing") or []) == 1


def test_server_timing_is_off_by_default(relay: RelayServer) -> None:
    reply = post(relay)
    assert reply.status == 200
    assert reply.header("server-timing") is None


LOWERED = 1024


@contextmanager
def soft_open_file_limit(limit: int) -> Iterator[None]:
    """Lower this process's soft limit (which a child inherits), and restore it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_open_file_limit_is_raised_and_logged(tmp_path: Path, upstream: UpstreamThread) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard <= LOWERED:
        pytest.skip(f"needs a finite hard open-file limit above {LOWERED}, not {hard}")
    with soft_open_file_limit(LOWERED):
        server = start_relay(tmp_path / "relay", upstream.base_url)
    try:
        (logged,) = server.wait_for_log(r"open-file limit (\d+)$")
        # Started with the soft limit at 1024, the relay raised it to the hard limit, and says so.
        assert int(logged.group(1)) == hard
        assert_chat_completion(post(server))
    finally:
        server.stop()


def test_json_access_log_lines_are_json_and_nothing_else(upstream: UpstreamThread, tmp_path: Path) -> None:
    """What a log shipper reads from stdout: one JSON object per line, no prefix, nothing interleaved."""
    config, env = write_config(tmp_path, upstream.base_url, access_log="json")
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    command = [sys.executable, "-m", "relay", "serve", "--config", str(config), "--env-file", str(env), "--port", str(free_port())]
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err)
    server = RelayServer(process, stderr, port=int(command[-1]))
    try:
        wait_healthy(server)
        for body, target in ((CHAT_BODY, CHAT), (STREAM_BODY, CHAT), (RESPONSES_BODY, RESPONSES), (b"{nope", CHAT)):
            post(server, body, target)
        deadline = time.monotonic() + 5
        while stdout.read_text().count("\n") < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        server.stop()
    lines = stdout.read_text().splitlines()
    assert len(lines) == 4 and all(isinstance(json.loads(line), dict) for line in lines), lines
    assert "relay: POST" in stderr.read_text()  # the relay's own lines go to stderr, with their level
