"""`relay nemo-gym install DIR` and the server it installs, started as ng_run starts a model server:
`python app.py` in the server's directory, with the whole merged config, unresolved, in
NEMO_GYM_CONFIG_DICT and the server's name in NEMO_GYM_CONFIG_PATH, listening where the config says.
(The run under Gym's own ng_run and collector is `make test-nemo-gym`, tests/nemo_gym_e2e.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.testing import UpstreamThread
from tests.capture_schema import check_record
from tests.gym_configs import model_server
from tests.clients import RESPONSES, post, requests_seen
from tests.servers import API_KEY, ROOT, RelayServer, free_port, wait_healthy

SERVER = Path("responses_api_models") / "relay_model"


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "relay", "nemo-gym", "install", str(root), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)


@pytest.fixture
def gym_root(tmp_path: Path) -> Path:
    root = tmp_path / "gym"
    (root / "resources_servers").mkdir(parents=True)
    result = install(root)
    assert result.returncode == 0, result.stderr
    return root


def test_install_writes_a_gym_model_server(gym_root: Path) -> None:
    server = gym_root / SERVER
    config = yaml.safe_load((server / "configs" / "relay_model.yaml").read_text())
    # Gym's openai_model.yaml with the implementation renamed: the same keys, the same placeholders.
    assert config == model_server("relay_model")
    requirements = [line for line in (server / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    assert requirements == [f"relay @ {ROOT.as_uri()}"]
    compile((server / "app.py").read_text(), "app.py", "exec")


def test_install_takes_another_requirement_and_refuses_a_non_gym_directory(tmp_path: Path) -> None:
    (tmp_path / "env.yaml").write_text("policy_api_key: x\n")
    result = install(tmp_path, "--requirement", "relay==0.1.0")
    assert result.returncode == 0 and "relay_model.yaml" in result.stdout, result.stderr
    assert (tmp_path / SERVER / "requirements.txt").read_text().splitlines()[-1] == "relay==0.1.0"
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = install(empty)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2 and len(lines) == 1 and "does not look like a NeMo Gym root" in lines[0]


def ng_run_config(gym_root: Path, port: int, upstreams: Any, **top: Any) -> dict[str, Any]:
    """What ng_run hands each server: every block with its host and port, env.yaml merged in, unresolved."""
    config = yaml.safe_load((gym_root / SERVER / "configs" / "relay_model.yaml").read_text())
    block = config["policy_model"]["responses_api_models"]["relay_model"]
    block.update(host="127.0.0.1", port=port, num_workers=2)
    config["mcqa"] = {"resources_servers": {"mcqa": {"entrypoint": "app.py", "domain": "knowledge", "host": "127.0.0.1", "port": 1}}}
    config.update(policy_base_url=upstreams, policy_api_key=API_KEY, policy_model_name="gym-entry-model", **top)
    config.update(head_server={"host": "127.0.0.1", "port": 11000}, skip_venv_if_present=True, python_version="3.13.0")
    return config


def start_like_ng_run(gym_root: Path, config: dict[str, Any], started: list[RelayServer]) -> RelayServer:
    server_dir = gym_root / SERVER
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith(("policy_", "relay_", "nemo_gym_"))}
    # ng_run: `cd <server dir> && python app.py`, PYTHONPATH=<server dir>:<inherited>; here the inherited part
    # is this checkout, so the relay under test is the one imported.
    env.update(NEMO_GYM_CONFIG_DICT=yaml.safe_dump(config), NEMO_GYM_CONFIG_PATH="policy_model", PYTHONPATH=f"{server_dir}{os.pathsep}{ROOT}")
    log_path = gym_root / "policy_model.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=server_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = RelayServer(process, log_path, port=config["policy_model"]["responses_api_models"]["relay_model"]["port"])
    started.append(server)
    wait_healthy(server)
    return server


def test_started_as_ng_run_starts_it(gym_root: Path, upstream: UpstreamThread, started: list[RelayServer], tmp_path: Path) -> None:
    port = free_port()
    # Two entries for the one fake upstream make a fleet, where the session cookie matters.
    upstreams = [upstream.base_url, upstream.base_url.replace("127.0.0.1", "localhost")]
    captures = tmp_path / "captures"
    config = ng_run_config(gym_root, port, upstreams, observability_enabled=True, model_call_capture_dir=str(captures))
    server = start_like_ng_run(gym_root, config, started)
    began = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:  # ng_run's readiness probe
        assert answer.status == 200
    assert time.monotonic() - began < 1.0
    # Without a rollout prefix (observability off) a conversation is known by the relay's cookie, which
    # Gym's agents send back each turn; the prefix's rollout id is the key where there is one.
    reply = post(server, b'{"input":"hi"}', RESPONSES)
    assert reply.status == 200 and reply.json()["model"] == "gym-entry-model"
    cookie = (reply.header("set-cookie") or "").split(";")[0]
    assert cookie.startswith("RelayModel___policy_model="), cookie
    assert post(server, b'{"input":"again"}', RESPONSES, {"Cookie": cookie}).header("set-cookie") is None
    assert post(server, b'{"input":"hi"}', f"/ng-rollout/0-0{RESPONSES}").header("set-cookie") is None
    seen = requests_seen(upstream, 3)
    assert {request.path for request in seen} == {RESPONSES} and seen[0].json()["model"] == "gym-entry-model"
    assert all(request.header("cookie") is None for request in seen)  # never forwarded upstream
    deadline = time.monotonic() + 5
    while not (captures / "0-0.capture.jsonl").exists():
        assert time.monotonic() < deadline, "no capture record"
        time.sleep(0.02)
    record = check_record(json.loads((captures / "0-0.capture.jsonl").read_text().splitlines()[0]))
    assert record["model_ref"] == {"type": "responses_api_models", "name": "policy_model"}
    server.wait_for_log(r"Started server process", count=2)  # num_workers: 2
    server.process.send_signal(signal.SIGINT)  # how ng_run stops its servers
    assert server.process.wait(timeout=20) == 0 and "Traceback" not in server.log(), server.log()[-2000:]


def test_a_config_error_under_ng_run_is_one_line(gym_root: Path) -> None:
    config = ng_run_config(gym_root, free_port(), "http://127.0.0.1:9/v1")
    config["policy_api_key"] = "???"
    server_dir = gym_root / SERVER
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith(("policy_", "relay_", "nemo_gym_"))}
    env.update(NEMO_GYM_CONFIG_DICT=yaml.safe_dump(config), NEMO_GYM_CONFIG_PATH="policy_model", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "app.py"], cwd=server_dir, env=env, capture_output=True, text=True, timeout=20)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "policy_api_key is ???" in lines[0], result.stderr
