"""The relay as NeMo Gym's model server, over real sockets: Gym's config files through `relay serve`
(several --config, --server), the /ng-rollout/<id>/ prefix on every route (stripped, never forwarded,
malformed ones refused), drop_input_reasoning_items and max_http_attempts against the fake upstream, and
the capture records of prefixed calls (JSON, both streams, errors, the cap; none when capture is off).
`python -m relay.nemo_gym` as ng_run starts it and `relay nemo-gym install` are in test_nemo_gym_entrypoint.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.testing import UpstreamThread
from tests.capture_schema import check_record
from tests.gym_configs import MCQA, model_server
from tests.clients import CHAT, RESPONSES, assert_openai_error, connect, get, post, post_bytes, read_head, read_to_end, requests_seen
from tests.servers import API_KEY, ROOT, RelayServer, wait_healthy

MODEL = "gym-test-model"
POLICY = model_server("relay_model")

REASONING_INPUT = {
    "input": [
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "user", "content": "hi"},
    ]
}


def policy(**keys: Any) -> dict[str, Any]:
    block = {**POLICY["policy_model"]["responses_api_models"]["relay_model"], **keys}
    return {"policy_model": {"responses_api_models": {"relay_model": block}}}


def clean_environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith(("policy_", "relay_", "nemo_gym_"))}
    return env | extra


def start_gym_relay(
    directory: Path, upstream_url: str, documents: list[Mapping[str, Any]], *, args: tuple[str, ...] = (), env: Mapping[str, str] | None = None
) -> RelayServer:
    """`relay serve --config a.yaml --config b.yaml` on Gym's files, credentials in env.yaml."""
    directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "relay", "serve", "--port", "0", "--env-file", str(directory / "env.yaml"), *args]
    for index, document in enumerate(documents):
        path = directory / f"config{index}.yaml"
        path.write_text(yaml.safe_dump(dict(document)))
        command += ["--config", str(path)]
    (directory / "env.yaml").write_text(yaml.safe_dump({"policy_base_url": upstream_url, "policy_api_key": API_KEY, "policy_model_name": MODEL}))
    log_path = directory / "relay.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=clean_environment(**(env or {})))
    server = RelayServer(process, log_path)
    wait_healthy(server)
    return server


@pytest.fixture(scope="module")
def captures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("captures")


@pytest.fixture(scope="module")
def gym_relay(upstream: UpstreamThread, tmp_path_factory: pytest.TempPathFactory, captures: Path) -> Iterator[RelayServer]:
    """Gym's layout with capture on (top-level keys, as ng_run's ++observability_enabled=true puts them)."""
    top = {"observability_enabled": True, "model_call_capture_dir": str(captures)}
    server = start_gym_relay(tmp_path_factory.mktemp("gym"), upstream.base_url, [MCQA, policy(access_log="json", model_call_capture_max_bytes=16384), top])
    yield server
    server.stop()


def capture_lines(directory: Path, rollout_id: str, count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The records of one rollout, once there are `count` (they are written just after the answer)."""
    path = directory / f"{rollout_id}.capture.jsonl"
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return [check_record(json.loads(line)) for line in lines]
        assert time.monotonic() < deadline, f"{len(lines)} of {count} records in {path}"
        time.sleep(0.02)


# --- Gym's config files through relay serve ----------------------------------------------------------------


def test_gyms_config_files_serve_unchanged(gym_relay: RelayServer, upstream: UpstreamThread) -> None:
    reply = post(gym_relay, b'{"input":"hi","model":"ignored"}', RESPONSES)
    assert reply.status == 200 and reply.json()["model"] == MODEL
    (seen,) = requests_seen(upstream, 1)
    assert seen.json()["model"] == MODEL and seen.header("authorization") == f"Bearer {API_KEY}"
    assert get(gym_relay, "/v1/models").json()["data"][0]["id"] == MODEL


def test_several_candidates_need_server(tmp_path: Path, upstream: UpstreamThread, started: list[RelayServer]) -> None:
    judge = {"judge_model": {"responses_api_models": {"openai_model": {**POLICY["policy_model"]["responses_api_models"]["relay_model"], "openai_model": "judge"}}}}
    config = tmp_path / "both.yaml"
    config.write_text(yaml.safe_dump({**POLICY, **judge}))
    env = clean_environment(POLICY_BASE_URL=upstream.base_url, POLICY_API_KEY=API_KEY, POLICY_MODEL_NAME=MODEL)
    command = [sys.executable, "-m", "relay", "serve", "--config", str(config), "--port", "0"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=20)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert all(fragment in lines[0] for fragment in ("policy_model", "judge_model", "--server")), lines
    started.append(start_gym_relay(tmp_path / "judge", upstream.base_url, [{**POLICY, **judge}], args=("--server", "judge_model")))
    assert post(started[0], b'{"input":"hi"}', RESPONSES).json()["model"] == "judge"


# --- the rollout prefix ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        (f"/ng-rollout/0-0{RESPONSES}", RESPONSES),
        (f"/ng-rollout/7-2-a1/training-token-capture{CHAT}", CHAT),
        (f"/ng-rollout/run.1_x{CHAT}?trace=1", f"{CHAT}?trace=1"),
    ],
)
def test_the_prefix_is_stripped_and_never_forwarded(gym_relay: RelayServer, upstream: UpstreamThread, target: str, forwarded: str) -> None:
    body = b'{"messages":[{"role":"user","content":"hi"}]}' if CHAT in target else b'{"input":"hi"}'
    reply = post(gym_relay, body, target)
    assert reply.status == 200, reply.body
    (seen,) = requests_seen(upstream, 1)
    assert seen.path == forwarded
    rollout_id = target.split("/")[2]
    (line,) = gym_relay.wait_for_log(rf'^\{{"method".*"rollout_id":"{re.escape(rollout_id)}".*\}}$')
    assert json.loads(line.group(0))["path"] == forwarded.split("?")[0]


@pytest.mark.parametrize("target", ["/ng-rollout/0-0/", "/ng-rollout/0-0/health", "/ng-rollout/0-0/training-token-capture/readyz"])
def test_other_routes_under_the_prefix(gym_relay: RelayServer, target: str) -> None:
    reply = get(gym_relay, target)
    assert reply.status == 200 and reply.json() == {"status": "ok"}


@pytest.mark.parametrize(
    "target",
    [
        f"/ng-rollout/-x{RESPONSES}",
        f"/ng-rollout/{RESPONSES}",
        "/ng-rollout/0-0",
        f"/ng-rollout/a%20b{RESPONSES}",
        f"/ng-rollout/a/ng-rollout/b{RESPONSES}",
        f"/ng-rollout/{'x' * 201}{RESPONSES}",
        "/ng-rollout/0-0/v1/messages",
    ],
)
def test_malformed_prefixes_are_refused(gym_relay: RelayServer, upstream: UpstreamThread, target: str) -> None:
    assert_openai_error(post(gym_relay, b'{"input":"hi"}', target), 404, "unknown_url")
    requests_seen(upstream, 0)


# --- Gym's seed keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("env", "kept"), [({}, True), ({"POLICY_DROP_REASONING_ITEMS": "true"}, False)])
def test_drop_input_reasoning_items(tmp_path: Path, upstream: UpstreamThread, started: list[RelayServer], env: dict[str, str], kept: bool) -> None:
    started.append(start_gym_relay(tmp_path, upstream.base_url, [POLICY], env=env))
    assert post(started[0], json.dumps(REASONING_INPUT).encode(), RESPONSES).status == 200
    chat_body = {"messages": [{"role": "user", "content": "hi"}], "input": REASONING_INPUT["input"]}
    assert post(started[0], json.dumps(chat_body).encode(), CHAT).status == 200
    responses_request, chat_request = requests_seen(upstream, 2)
    types = [item["type"] for item in responses_request.json()["input"]]
    assert types == (["reasoning", "message"] if kept else ["message"])
    assert len(chat_request.json()["input"]) == 2  # the Responses endpoint only, as openai_model


@pytest.mark.parametrize(("status", "attempts"), [(429, 2), (503, 2), (500, 1), (404, 1), (400, 1)])
def test_max_http_attempts(tmp_path: Path, upstream: UpstreamThread, started: list[RelayServer], status: int, attempts: int) -> None:
    started.append(start_gym_relay(tmp_path, upstream.base_url, [policy(max_http_attempts=2, retry={"backoff": 0.05})]))
    reply = post(started[0], b'{"input":"hi"}', RESPONSES, {"x-fake-status": str(status)})
    assert reply.status == status  # the upstream's own status and body, not openai_model's 500
    requests_seen(upstream, attempts)


# --- capture -----------------------------------------------------------------------------------------------


def test_a_json_call_is_captured(gym_relay: RelayServer, captures: Path) -> None:
    reply = post(gym_relay, b'{"input":"hi","model":"ignored"}', f"/ng-rollout/json-1{RESPONSES}", {"x-session-id": "sess-9"})
    (record,) = capture_lines(captures, "json-1")
    assert record["request"] == {"input": "hi", "model": "ignored"} and record["response"] == reply.json()
    assert record["status_code"] == 200 and record["error_category"] is None and record["dialect"] == "responses"
    assert record["model_ref"] == {"type": "responses_api_models", "name": "policy_model"}
    assert record["client_session_id"] == "sess-9" and "response_raw" not in record
    assert record["latency_ttft_ms"] is not None and record["latency_ttft_ms"] <= record["latency_ms"]


def test_streams_are_captured_reassembled(gym_relay: RelayServer, captures: Path) -> None:
    reply = post(gym_relay, b'{"input":"hi","stream":true}', f"/ng-rollout/stream-1{RESPONSES}", {"x-fake-events": "3"})
    (record,) = capture_lines(captures, "stream-1")
    assert record["response_raw"] == reply.body.decode() and record["error_category"] is None
    assert record["response"]["status"] == "completed" and record["response"]["model"] == MODEL
    body = b'{"messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}'
    post(gym_relay, body, f"/ng-rollout/stream-2{CHAT}", {"x-fake-events": "3"})
    (chat,) = capture_lines(captures, "stream-2")
    assert chat["dialect"] == "chat" and chat["response"]["object"] == "chat.completion" and chat["response"]["usage"]["prompt_tokens"] == 12
    assert chat["response"]["choices"][0]["finish_reason"] == "stop" and chat["response"]["choices"][0]["message"]["content"]


def test_errors_and_oversized_answers_are_captured(gym_relay: RelayServer, captures: Path) -> None:
    reply = post(gym_relay, b'{"input":"hi"}', f"/ng-rollout/err-1{RESPONSES}", {"x-fake-status": "401"})
    (record,) = capture_lines(captures, "err-1")
    assert (record["status_code"], record["error_category"], record["response"]) == (401, "auth", None)
    assert record["response_raw"] == reply.body.decode()
    big = post(gym_relay, b'{"input":"hi"}', f"/ng-rollout/big-1{RESPONSES}", {"x-fake-size": "40000"})
    assert big.status == 200 and len(big.body) > 16384  # the client gets all of it
    (capped,) = capture_lines(captures, "big-1")
    assert capped["response_raw_truncated"] is True and capped["response"] is None and len(capped["response_raw"]) == 16384


def test_a_stream_cut_by_a_deadline_is_captured_as_a_timeout(tmp_path: Path, upstream: UpstreamThread, started: list[RelayServer]) -> None:
    captured = tmp_path / "captures"
    top = {"observability_enabled": True, "model_call_capture_dir": str(captured)}
    started.append(start_gym_relay(tmp_path / "relay", upstream.base_url, [policy(read_timeout=0.3), top]))
    stalls = {"x-fake-events": "3", "x-fake-event-delay-ms": "1500"}  # the first gap outlasts read_timeout
    with connect(started[0].port) as sock:
        sock.sendall(post_bytes(b'{"input":"hi","stream":true}', f"/ng-rollout/stall-1{RESPONSES}", stalls))
        response = read_head(sock)
        assert response.status == 200
        _, complete = read_to_end(response)
    assert not complete
    (record,) = capture_lines(captured, "stall-1")
    assert (record["status_code"], record["error_category"], record["response"]) == (200, "timeout", None)


def test_calls_of_one_rollout_append_to_its_file(gym_relay: RelayServer, captures: Path) -> None:
    for _ in range(3):
        post(gym_relay, b'{"input":"hi"}', f"/ng-rollout/multi-1{RESPONSES}")
    records = capture_lines(captures, "multi-1", count=3)
    assert len({record["model_call_id"] for record in records}) == 3


def test_no_capture_without_prefix_or_when_off(gym_relay: RelayServer, captures: Path, tmp_path: Path, upstream: UpstreamThread, started: list[RelayServer]) -> None:
    before = set(os.listdir(captures))
    post(gym_relay, b'{"input":"hi"}', RESPONSES)
    get(gym_relay, "/ng-rollout/get-1/")
    off = tmp_path / "off"
    started.append(start_gym_relay(tmp_path / "relay", upstream.base_url, [POLICY, {"model_call_capture_dir": str(off)}]))
    assert post(started[0], b'{"input":"hi"}', f"/ng-rollout/off-1{RESPONSES}").status == 200
    time.sleep(0.3)  # a record would be written within milliseconds
    assert set(os.listdir(captures)) == before and not off.exists()
