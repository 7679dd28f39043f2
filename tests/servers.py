"""The relay under test as a real process: `relay serve` (uvicorn) on a free port of 127.0.0.1, with a
config and env file written for the test, in the shape of conf/openai_model.yaml and env.yaml."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from starlette.types import ASGIApp

from bench.procs import rss_bytes
from relay.config import CONFIG_ENV, ENV_FILE_ENV
from relay.testing.ports import free_port as free_port  # re-exported: tests import it from here

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "sk-test-relay-SECRET-0123456789abcdef"
MODEL = "relay-test-model"
START_TIMEOUT = 20.0


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

    def wait_for_log(self, pattern: str, count: int = 1, timeout: float = 5.0) -> list[re.Match[str]]:
        """Every match of `pattern` (a regex, multiline) in the log, once there are at least `count`.

        The relay logs after it answered, so a test that just got its reply polls here; a line that never
        comes fails the test after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            found = list(re.finditer(pattern, self.log(), re.MULTILINE))
            if len(found) >= count:
                return found
            assert time.monotonic() < deadline, f"{count} log line(s) matching {pattern!r} not found:\n{self.log()[-3000:]}"
            time.sleep(0.02)

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop a process this test run started, by its PID: SIGTERM, then SIGKILL after 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


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


# How the relay is started: its own command, or the plain uvicorn CLI (which serves it without
# relay.protocol, so the app watches the connection through ASGI alone).
RELAY_SERVE = "relay serve"
PLAIN_UVICORN = "uvicorn"


def start_relay(
    directory: Path,
    upstream_url: str,
    *,
    args: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
    launcher: str = RELAY_SERVE,
    **overrides: Any,
) -> RelayServer:
    """Start the relay with this config; `env` adds variables to the relay's environment (for values
    that the config takes from the environment)."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path, env_path = write_config(directory, upstream_url, **overrides)
    log_path = directory / "relay.log"
    # Port 0: the relay binds a free port itself (no race with other processes), and says which.
    if launcher == PLAIN_UVICORN:
        command = [sys.executable, "-m", "uvicorn", "relay.app:app", "--host", "127.0.0.1", "--port", "0", *args]
        env = {CONFIG_ENV: str(config_path), ENV_FILE_ENV: str(env_path), **(env or {})}
    else:
        command = [sys.executable, "-m", "relay", "serve", "--config", str(config_path), "--env-file", str(env_path)]
        command += ["--port", "0", *args]
    with log_path.open("wb") as log:
        environment = {**os.environ, **env} if env else None
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=environment)
    server = RelayServer(process, log_path, config=overrides)
    wait_healthy(server)
    return server


_LISTENING = re.compile(r"Uvicorn running on http://(?:127\.0\.0\.1|localhost):(\d+)")


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


# --- measuring a relay process, and serving the app in-process -----------------------------------------


def relay_rss(server: RelayServer) -> int:
    """Resident memory of the relay process (VmRSS), what an operator's dashboard would show."""
    return rss_bytes(server.process.pid)


def relay_open_fds(server: RelayServer) -> int:
    """File descriptors the relay process holds: sockets in both directions, pipes, its log."""
    return len(os.listdir(f"/proc/{server.process.pid}/fd"))


def relay_metric(server: RelayServer, name: str) -> float:
    """The value of an unlabelled metric from the relay's GET /metrics (one process, so one sample)."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as response:
        return metric_value(response.read().decode(), name)


def metric_value(text: str, name: str) -> float:
    """One unlabelled sample from the Prometheus text format."""
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} not found in /metrics")


@asynccontextmanager
async def serve_in_process(app: ASGIApp, timeout: float = START_TIMEOUT) -> AsyncIterator[int]:
    """Serve `app` with uvicorn on a free port of 127.0.0.1 inside the running loop; yield the port.

    For tests that must hand the app what a config file cannot carry (a resolver that fails, say).
    """
    # log_config=None: uvicorn must not reconfigure logging inside the test process.
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_config=None, access_log=False)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    deadline = time.monotonic() + timeout
    while not server.started:
        if serving.done():
            await serving  # raises whatever stopped it
            raise RuntimeError("uvicorn stopped before it started listening")
        if time.monotonic() > deadline:
            serving.cancel()
            raise RuntimeError(f"uvicorn did not start listening within {timeout} s")
        await asyncio.sleep(0.01)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, timeout)
