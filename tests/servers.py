"""The relay under test as a real process: `relay serve` (uvicorn) on a free port of 127.0.0.1, with a
config and env file written for the test, in the shape of conf/openai_model.yaml and env.yaml."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "sk-test-relay-SECRET-0123456789abcdef"
MODEL = "relay-test-model"
START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RelayServer:
    """A relay process under test. `url` is its root, `api_url` what an OpenAI client takes as base_url."""

    process: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def write_config(directory: Path, upstream_url: str, **overrides: Any) -> tuple[Path, Path]:
    """A config in the shape of conf/openai_model.yaml, its credentials in an env file beside it."""
    config = {
        "openai_base_url": "${policy_base_url}",
        "openai_api_key": "${policy_api_key}",
        "openai_model": "${policy_model_name}",
        "openai_default_headers": {},
        "extra_body": {},
        "max_concurrent_requests": None,
        **overrides,
    }
    env = {"policy_base_url": upstream_url, "policy_api_key": API_KEY, "policy_model_name": MODEL}
    config_path = directory / "relay.yaml"
    env_path = directory / "env.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env_path.write_text(yaml.safe_dump(env))
    return config_path, env_path


def start_relay(directory: Path, upstream_url: str, *, args: tuple[str, ...] = (), **overrides: Any) -> RelayServer:
    directory.mkdir(parents=True, exist_ok=True)
    config_path, env_path = write_config(directory, upstream_url, **overrides)
    log_path = directory / "relay.log"
    command = [sys.executable, "-m", "relay", "serve", "--config", str(config_path), "--env-file", str(env_path)]
    # Port 0: the relay binds a free port itself (no race with other processes), and says which.
    command += ["--port", "0", *args]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    server = RelayServer(process, log_path, config=overrides)
    wait_healthy(server)
    return server


_LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


def wait_healthy(server: RelayServer) -> None:
    """Wait for the relay to say where it listens (when started on port 0) and to answer /health."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"relay exited with {server.process.returncode}:\n{server.log()}")
        if not server.port:
            found = _LISTENING.search(server.log())
            if found is None:
                time.sleep(0.05)
                continue
            server.port = int(found.group(1))
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"relay did not become healthy in {START_TIMEOUT} s:\n{server.log()}")
