"""Configuration: errors stop startup with one line that names the key and where to set it, and never a
value; `${var}` placeholders resolve from the env file, then the environment; and the three ways to
start the relay (`relay serve --workers 2`, plain `uvicorn relay.app:app`, local mode) each serve a chat
completion end to end and stop cleanly by PID.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from relay.testing import UpstreamThread
from tests.clients import CHAT_BODY, exchange, post_bytes
from tests.servers import API_KEY, MODEL, ROOT, RelayServer, free_port, start_relay, wait_healthy, write_config
from relay.config import ConfigError, load_settings

SECRET = "sk-config-SECRET-do-not-print-7f3a9c"
RUN_TIMEOUT = 20.0  # a config error exits at once; a config wrongly accepted would serve until killed

# --- helpers -----------------------------------------------------------------------------------------


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without anything the relay could read a value or a path from."""
    env = {name: value for name, value in os.environ.items() if not name.lower().startswith(("policy_", "relay_"))}
    return env | extra


def valid_config(**overrides: Any) -> dict[str, Any]:
    return {
        "openai_base_url": "${policy_base_url}",
        "openai_api_key": "${policy_api_key}",
        "openai_model": "${policy_model_name}",
        **overrides,
    }


VALID_ENV = {"policy_base_url": "http://127.0.0.1:9/v1", "policy_api_key": SECRET, "policy_model_name": MODEL}


def write_yaml(path: Path, content: Mapping[str, Any] | str) -> Path:
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(dict(content)))
    return path


def run_serve(config: Path, env_file: Path, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "relay", "serve", "--config", str(config), "--env-file", str(env_file)]
    command += ["--port", str(free_port())]
    return subprocess.run(
        command, cwd=ROOT, env=dict(env or clean_environment()), capture_output=True, text=True, timeout=RUN_TIMEOUT
    )


def pid_alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def child_pids(pid: int, marker: str) -> list[int]:
    """Live children of `pid` whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid and marker in cmdline and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """The PIDs still running after a bounded wait."""
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if pid_alive(pid)]


def chat_through(server: RelayServer) -> Any:
    """One chat completion with the openai SDK, as a user of the relay would."""
    client = openai.OpenAI(base_url=server.api_url, api_key="any-client-key", max_retries=0, timeout=10)
    try:
        return client.chat.completions.create(model="ignored", messages=[{"role": "user", "content": "hi"}])
    finally:
        client.close()


@pytest.fixture
def spawned() -> Iterator[list[RelayServer]]:
    """Servers a test started by hand; stopped (by PID) even when the test fails."""
    servers: list[RelayServer] = []
    yield servers
    for server in servers:
        server.stop()


def spawn(servers: list[RelayServer], command: list[str], cwd: Path, env: Mapping[str, str], log: Path, port: int) -> RelayServer:
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT)
    server = RelayServer(process, log, port)
    servers.append(server)
    wait_healthy(server)
    return server


# --- config errors, through `relay serve` ------------------------------------------------------------

# (id, config, env file, fragments the one line must contain). {config} and {env} stand for the paths
# (str.format: a literal brace is doubled).
CONFIG_ERRORS: list[tuple[str, Mapping[str, Any] | str | None, Mapping[str, Any] | str, list[str]]] = [
    ("missing-file", None, VALID_ENV, ["{config}", "not found", "--config", "RELAY_CONFIG"]),
    ("not-a-mapping", "- openai_base_url\n- openai_api_key\n", VALID_ENV, ["{config}", "YAML mapping"]),
    ("missing-required", {"openai_base_url": "${policy_base_url}", "openai_api_key": "${policy_api_key}"},
     VALID_ENV, ["{config}", "openai_model", "required"]),
    ("unresolved-placeholder", valid_config(), {k: v for k, v in VALID_ENV.items() if k != "policy_api_key"},
     ["openai_api_key", "${{policy_api_key}}", "{env}", "POLICY_API_KEY"]),
    ("cap-not-a-number", valid_config(max_concurrent_requests="ten"), VALID_ENV, ["{config}", "max_concurrent_requests"]),
    ("negative-timeout", valid_config(read_timeout=-1), VALID_ENV, ["{config}", "read_timeout"]),
    ("ftp-url", valid_config(openai_base_url="ftp://x"), VALID_ENV, ["{config}", "openai_base_url"]),
    ("unknown-key", valid_config(max_concurent_requests=3), VALID_ENV, ["{config}", "max_concurent_requests"]),
    # The value that fails validation is the secret itself: the message must still not show it.
    ("secret-as-url", valid_config(openai_base_url="${policy_api_key}"), VALID_ENV, ["{config}", "openai_base_url"]),
    ("authorization-header", valid_config(openai_default_headers={"Authorization": "Bearer ${policy_api_key}"}),
     VALID_ENV, ["{config}", "openai_default_headers", "openai_api_key"]),
    # Both go into the upstream request's head: a line break would start a header of its own.
    ("key-with-line-break", valid_config(), {**VALID_ENV, "policy_api_key": SECRET + "\nX-Injected: 1"},
     ["{config}", "openai_api_key", "one line"]),
    ("header-with-line-break", valid_config(openai_default_headers={"X-Team": "rl\r\nX-Injected: 1"}), VALID_ENV,
     ["{config}", "openai_default_headers", "one-line"]),
    ("space-in-url", valid_config(openai_base_url="http://127.0.0.1:9/v1 x"), VALID_ENV,
     ["{config}", "openai_base_url", "spaces"]),
    ("framing-header", valid_config(openai_default_headers={"Content-Length": "5"}), VALID_ENV,
     ["{config}", "openai_default_headers", "content-length"]),
    ("env-file-not-yaml", valid_config(), f"policy_api_key: {SECRET}\n  broken: [\n", ["{env}", "not valid YAML"]),
    # Credentials in the URL would be printed wherever the URL is (the startup line, errors).
    ("credentials-in-url", valid_config(openai_base_url=f"http://user:{SECRET}@127.0.0.1:9/v1"), VALID_ENV,
     ["{config}", "openai_base_url", "openai_api_key"]),
    # Several upstreams: each entry checked like one URL, and the list as a whole.
    ("empty-upstream-list", valid_config(openai_base_url=[]), VALID_ENV, ["{config}", "openai_base_url", "at least one"]),
    ("duplicate-upstream", valid_config(openai_base_url=["http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1/"]), VALID_ENV,
     ["{config}", "openai_base_url", "twice"]),
    ("space-in-an-upstream", valid_config(openai_base_url=["http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1 x"]), VALID_ENV,
     ["{config}", "openai_base_url[1]", "spaces"]),
    ("upstream-entry-without-url", valid_config(openai_base_url=[{"weight": 2}]), VALID_ENV, ["{config}", "openai_base_url[0]", "url"]),
    ("unknown-routing-key", valid_config(routing={"affinty": "auto"}), VALID_ENV, ["{config}", "routing", "affinty"]),
    ("cluster-without-a-limit", valid_config(cluster={"redis_url": "redis://127.0.0.1:9/0", "name": "job"}), VALID_ENV,
     ["{config}", "cluster", "sets no limit"]),
    ("cluster-without-a-name", valid_config(cluster={"redis_url": "redis://127.0.0.1:9/0", "max_concurrent_requests": 8}),
     VALID_ENV, ["{config}", "cluster", "name"]),
    ("cluster-unknown-key", valid_config(cluster={"redis_url": "redis://127.0.0.1:9/0", "name": "job", "cap": 8}), VALID_ENV,
     ["{config}", "cluster", "unknown key 'cap'"]),
    # The Redis URL may carry a password: a URL that fails the check is not shown either.
    ("cluster-url-with-secret", valid_config(cluster={"redis_url": f"http://:{SECRET}@127.0.0.1:9", "name": "job",
     "max_concurrent_requests": 8}), VALID_ENV, ["{config}", "cluster.redis_url", "redis://"]),
    ("cluster-name-with-brace", valid_config(cluster={"redis_url": "redis://127.0.0.1:9/0", "name": "a{b}",
     "max_concurrent_requests": 8}), VALID_ENV, ["{config}", "cluster.name"]),
    # A missing space after the colon makes the whole line one unknown key, the secret included.
    ("secret-in-unknown-key", "openai_base_url: ${{policy_base_url}}\nopenai_model: m\nopenai_api_key:" + SECRET + ":\n",
     VALID_ENV, ["{config}", "unknown key", "openai_api_key"]),
]


@pytest.mark.parametrize(("config", "env", "fragments"), [case[1:] for case in CONFIG_ERRORS], ids=[c[0] for c in CONFIG_ERRORS])
def test_config_error_stops_startup_with_one_line(
    tmp_path: Path, config: Mapping[str, Any] | str | None, env: Mapping[str, Any] | str, fragments: list[str]
) -> None:
    config_path = tmp_path / "relay.yaml"
    if config is not None:
        write_yaml(config_path, config)
    env_path = write_yaml(tmp_path / "env.yaml", env)
    result = run_serve(config_path, env_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("relay: config error:")
    for fragment in fragments:
        assert fragment.format(config=config_path, env=env_path.resolve()) in lines[0]
    assert SECRET not in result.stderr + result.stdout


def test_an_env_file_named_but_missing_stops_startup(tmp_path: Path) -> None:
    # The default env.yaml may be absent; one named with --env-file (or RELAY_ENV_FILE) is a typo if absent.
    config_path = write_yaml(tmp_path / "relay.yaml", valid_config())
    missing = tmp_path / "no-such-env.yaml"
    result = run_serve(config_path, missing, clean_environment(POLICY_BASE_URL="http://127.0.0.1:9/v1", POLICY_API_KEY=SECRET, POLICY_MODEL_NAME=MODEL))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(missing) in lines[0] and "not found" in lines[0] and "--env-file" in lines[0], lines


def test_placeholder_unresolved_even_with_a_differently_named_variable(tmp_path: Path) -> None:
    # The environment is searched for `name` and `NAME` only; anything else does not count.
    config_path = write_yaml(tmp_path / "relay.yaml", valid_config())
    env_path = write_yaml(tmp_path / "env.yaml", {k: v for k, v in VALID_ENV.items() if k != "policy_api_key"})
    result = run_serve(config_path, env_path, clean_environment(OPENAI_API_KEY=SECRET, Policy_Api_Key=SECRET))
    assert result.returncode == 2
    assert "${policy_api_key}" in result.stderr
    assert SECRET not in result.stderr + result.stdout


# --- load_settings: placeholders ---------------------------------------------------------------------


@pytest.fixture
def settings_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A config and an env file for load_settings, with an environment that sets none of their names."""
    for name in list(os.environ):
        if name.lower().startswith(("policy_", "relay_")):
            monkeypatch.delenv(name)
    env_path = tmp_path / "env.yaml"
    monkeypatch.setenv("RELAY_ENV_FILE", str(env_path))
    return tmp_path / "relay.yaml", env_path


@pytest.mark.parametrize(
    ("in_file", "as_written", "upper_case", "expected"),
    [
        ("from-file", "from-env", "FROM-ENV", "from-file"),  # the env file wins
        (None, "from-env", "FROM-ENV", "from-env"),  # then the variable as written
        (None, None, "FROM-ENV", "FROM-ENV"),  # then its upper-case name
        (None, "", "FROM-ENV", "FROM-ENV"),  # an empty variable counts as unset
    ],
)
def test_placeholder_resolution_order(
    settings_files: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    in_file: str | None,
    as_written: str | None,
    upper_case: str,
    expected: str,
) -> None:
    config_path, env_path = settings_files
    write_yaml(config_path, valid_config())
    env = {"policy_base_url": "http://127.0.0.1:9/v1", "policy_api_key": API_KEY}
    write_yaml(env_path, env | ({"policy_model_name": in_file} if in_file else {}))
    if as_written is not None:
        monkeypatch.setenv("policy_model_name", as_written)
    monkeypatch.setenv("POLICY_MODEL_NAME", upper_case)
    assert load_settings(config_path).openai_model == expected


def test_embedded_and_nested_placeholders(settings_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    config_path, env_path = settings_files
    config = valid_config(
        openai_base_url="http://${up_host}:${up_port}/v1",
        openai_default_headers={"OpenAI-Organization": "org-${org}"},
        extra_body={"stop": ["${word}", "end"]},
        max_concurrent_requests="${cap}",
    )
    write_yaml(config_path, config)
    write_yaml(env_path, {"policy_api_key": API_KEY, "policy_model_name": MODEL, "up_port": 8123, "cap": 4, "word": "halt"})
    monkeypatch.setenv("UP_HOST", "127.0.0.1")
    monkeypatch.setenv("org", "acme")
    settings = load_settings(config_path)
    assert settings.openai_base_url == "http://127.0.0.1:8123/v1"  # a number embedded as text
    assert dict(settings.openai_default_headers) == {"OpenAI-Organization": "org-acme"}
    assert settings.extra_body["stop"] == ["halt", "end"]
    assert settings.max_concurrent_requests == 4  # a lone placeholder keeps the YAML type


def test_settings_repr_has_no_key(settings_files: tuple[Path, Path]) -> None:
    config_path, env_path = settings_files
    write_yaml(config_path, valid_config())
    write_yaml(env_path, VALID_ENV | {"policy_api_key": API_KEY})
    settings = load_settings(config_path)
    assert settings.openai_api_key == API_KEY
    assert MODEL in repr(settings)  # the repr is informative...
    assert API_KEY not in repr(settings) and API_KEY not in str(settings)  # ...but keeps the key out


def test_unresolved_placeholder_error_names_where_to_set_it(settings_files: tuple[Path, Path]) -> None:
    config_path, env_path = settings_files
    write_yaml(config_path, valid_config(openai_default_headers={"OpenAI-Project": "${project}"}))
    write_yaml(env_path, VALID_ENV)
    with pytest.raises(ConfigError) as caught:
        load_settings(config_path)
    message = str(caught.value)
    assert "openai_default_headers.OpenAI-Project" in message  # the key, down to the nested one
    assert str(env_path.resolve()) in message and "PROJECT" in message
    assert SECRET not in message


# --- the other ways to start ----------------------------------------------------------------------------


def assert_relayed(reply: Any, upstream: UpstreamThread, model: str = MODEL) -> None:
    assert reply.model == model
    assert reply.choices[0].message.content
    recorded = upstream.upstream.requests
    assert len(recorded) == 1
    assert recorded[0].header("authorization") == f"Bearer {API_KEY}"
    assert recorded[0].json()["model"] == model


@pytest.mark.parametrize("protocol", [None, "relay.protocol:GuardedHttpToolsProtocol"], ids=["uvicorn-protocol", "relay-protocol"])
def test_plain_uvicorn_reads_config_from_environment(
    tmp_path: Path, upstream: UpstreamThread, spawned: list[RelayServer], protocol: str | None
) -> None:
    config_path, env_path = write_config(tmp_path, upstream.base_url)
    port = free_port()
    env = clean_environment(RELAY_CONFIG=str(config_path), RELAY_ENV_FILE=str(env_path))
    command = [sys.executable, "-m", "uvicorn", "relay.app:app", "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    server = spawn(spawned, command + (["--http", protocol] if protocol else []), ROOT, env, tmp_path / "uvicorn.log", port)
    assert_relayed(chat_through(server), upstream)
    assert API_KEY not in server.log()
    # The relay's own lines carry a level, as under relay serve; without its protocol it says the head
    # limits are off, and how to have them.
    server.wait_for_log(r"^INFO: +relay: POST /v1/chat/completions and /v1/responses -> ")
    warning = r"^WARNING: +relay: request_head_timeout and max_header_bytes are not enforced: .*--http relay\.protocol:GuardedHttpToolsProtocol"
    if protocol is None:
        server.wait_for_log(warning)
    else:
        assert not re.search(warning, server.log(), re.MULTILINE)


def test_serve_with_two_workers(tmp_path: Path, upstream: UpstreamThread, spawned: list[RelayServer]) -> None:
    server = start_relay(tmp_path, upstream.base_url, args=("--workers", "2"))
    spawned.append(server)
    workers = child_pids(server.process.pid, "spawn_main")
    assert len(workers) == 2, server.log()
    metrics_directory = Path(environment_of(workers[0])["PROMETHEUS_MULTIPROC_DIR"])
    assert metrics_directory.is_dir()
    assert_relayed(chat_through(server), upstream)
    server.stop()
    assert server.process.returncode is not None
    assert wait_gone(workers) == [], "workers outlived the relay"
    assert not metrics_directory.exists(), "the workers' metrics directory outlived the relay"


def environment_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().split("=", 1) for item in raw.split(b"\0") if b"=" in item)


def test_local_mode_without_env_yaml(tmp_path: Path, spawned: list[RelayServer]) -> None:
    # The working directory has no env.yaml, as after a fresh clone; PYTHONPATH finds the project.
    assert not (tmp_path / "env.yaml").exists()
    port = free_port()
    env = clean_environment(PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "relay", "serve", "--local", "--port", str(port), "--config", str(ROOT / "conf/openai_model.yaml")]
    server = spawn(spawned, command, tmp_path, env, tmp_path / "local.log", port)
    children = child_pids(server.process.pid, "relay.testing")
    try:
        assert "LOCAL MODE" in server.log()
        assert len(children) == 1
        reply = exchange(port, post_bytes(CHAT_BODY))
        assert reply.status == 200
        assert reply.json()["model"] == "local-fake-model"  # relayed to the bundled fake upstream
        server.stop()  # terminate by PID, then wait
        assert wait_gone(children, timeout=5) == [], "local mode left its fake upstream running"
    finally:
        for pid in children:  # started (indirectly) by this test: never leave it behind
            if pid_alive(pid):
                os.kill(pid, signal.SIGTERM)
