"""`make test-nemo-gym`: the relay inside a real NeMo Gym 0.7.0 run, then Gym's own openai_model in the
same place, each timed. Run with the Python of the venv that has nemo-gym and the relay (the Makefile
makes it).

Each run: a scratch Gym root (the mcqa resources server, the simple agent and the legacy environment
server copied from Gym's install, `relay nemo-gym install` for relay_model, `.venv` links to this venv,
as `++skip_venv_if_present=true` reuses them); the fake upstream (`python -m relay.testing`); `ng_run`
with mcqa.yaml and the model server's config; `ng_collect_rollouts` on mcqa's example data with
observability on. Then: every row has a response from the configured model, nothing failed, and Gym's
reader finds each rollout's capture records (none invalid, the response ids of the rows). While the
servers run, no listening socket of any process the run started is on an address other than loopback
(`ss`; Ray is held to 127.0.0.1 by RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). Every process started is
found again by an environment tag and stopped by PID: nothing is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.e2e_processes import TAG_ENV, Failed, check_loopback_only, free_port, stop_group, stop_tagged, tail

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "e2e-policy-model"
COPIED = ("resources_servers/mcqa", "responses_api_agents/simple_agent", "environment_servers/legacy_agent")
MODEL_CONFIGS = {
    "relay_model": "responses_api_models/relay_model/configs/relay_model.yaml",
    "openai_model": "responses_api_models/openai_model/configs/openai_model.yaml",
}
EXAMPLE = "resources_servers/mcqa/data/example.jsonl"


@dataclass
class Outcome:
    impl: str
    rows: int
    startup_s: float
    collect_s: float
    sockets_checked: int
    call_ms: list[float]  # each model call's latency inside the model server, from its capture record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40, help="repeats of mcqa's 5 example rows (default 40: 200 rollouts)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for the whole run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, rollouts, captures)")
    args = parser.parse_args()
    tag = uuid.uuid4().hex
    os.environ[TAG_ENV] = tag  # every process started from here inherits it, Ray's included
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(int(args.timeout))
    scratch = Path(tempfile.mkdtemp(prefix="rg-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    outcomes: list[Outcome] = []
    try:
        setup(scratch)
        with fake_upstream(scratch) as base_url:
            write_env(scratch, base_url)
            for impl in MODEL_CONFIGS:
                outcomes.append(run_once(scratch, impl, args.repeats, tag))
    except Failed as exc:
        print(f"\nFAILED: {exc}\n(logs in {scratch})", file=sys.stderr)
        args.keep = True
        raise SystemExit(1) from None
    finally:
        signal.alarm(0)
        left = stop_tagged(tag)
        if left:
            print(f"processes left behind and killed: {left}", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    report(outcomes)
    if left:
        raise SystemExit(1)


def _out_of_time(signum: int, frame: object) -> None:
    raise Failed("the run took longer than --timeout")


# --- the scratch Gym root -----------------------------------------------------------------------------


def setup(scratch: Path) -> None:
    import nemo_gym

    install_root = Path(nemo_gym.__file__).resolve().parent.parent
    for server in COPIED:
        shutil.copytree(install_root / server, scratch / server, ignore=shutil.ignore_patterns("__pycache__", ".venv"))
    result = subprocess.run([sys.executable, "-m", "relay", "nemo-gym", "install", str(scratch)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise Failed(f"relay nemo-gym install: {result.stderr.strip()}")
    print(result.stdout.strip())
    # ng_run with ++skip_venv_if_present=true runs each server with <cwd>/<type>/<impl>/.venv when it exists.
    for server in (*COPIED, "responses_api_models/relay_model", "responses_api_models/openai_model"):
        (scratch / server).mkdir(parents=True, exist_ok=True)
        (scratch / server / ".venv").symlink_to(sys.prefix)
    (scratch / "ray").mkdir()


def write_env(scratch: Path, base_url: str) -> None:
    lines = [f"policy_base_url: {base_url}", "policy_api_key: sk-e2e-not-a-real-key", f"policy_model_name: {MODEL}"]
    (scratch / "env.yaml").write_text("\n".join(lines) + "\n")


class fake_upstream:
    """The relay's fake OpenAI upstream as a process on a free port of 127.0.0.1."""

    def __init__(self, scratch: Path) -> None:
        self.log = scratch / "upstream.log"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> str:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "relay.testing", "--port", "0"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+/v1)", self.log.read_text())
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                raise Failed(f"the fake upstream exited: {self.log.read_text()}")
            time.sleep(0.1)
        raise Failed("the fake upstream did not start")

    def __exit__(self, *exc_info: object) -> None:
        assert self.process is not None
        stop_group(self.process, signal.SIGTERM, 10)


# --- one run: ng_run, the collector, the checks ---------------------------------------------------------


def gym_environment(scratch: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # Ray on 127.0.0.1 only (/tmp/ray_research/REPORT.md)
        RAY_AUTH_MODE="disabled",  # no token file in ~/.ray
        RAY_USAGE_STATS_ENABLED="0",  # no report home
        RAY_TMPDIR=str(scratch / "ray"),
        PYTHONUNBUFFERED="1",
        NO_PROXY="127.0.0.1,localhost",
    )
    return env


def run_once(scratch: Path, impl: str, repeats: int, tag: str) -> Outcome:
    captures = scratch / f"captures-{impl}"
    head_port = free_port()
    shared = ["++observability_enabled=true", f"++model_call_capture_dir={captures}", "++head_server.host=127.0.0.1", f"++head_server.port={head_port}"]
    command = [str(BIN / "ng_run"), f"+config_paths=[resources_servers/mcqa/configs/mcqa.yaml,{MODEL_CONFIGS[impl]}]", "++skip_venv_if_present=true", *shared]
    if impl == "relay_model":
        command.append("++policy_model.responses_api_models.relay_model.access_log=json")
    log_path = scratch / f"ng_run-{impl}.log"
    print(f"\n[{impl}] ng_run ... (log: {log_path})", flush=True)
    started = time.monotonic()
    with log_path.open("wb") as log:
        ng_run = subprocess.Popen(command, cwd=scratch, env=gym_environment(scratch), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(ng_run, head_port, log_path)
        startup = time.monotonic() - started
        print(f"[{impl}] all servers ready in {startup:.1f} s", flush=True)
        checked = check_loopback_only(tag)
        output = scratch / f"results-{impl}" / "rollouts.jsonl"
        collect = [
            str(BIN / "ng_collect_rollouts"), "+agent_name=mcqa_simple_agent", f"+input_jsonl_fpath={EXAMPLE}",
            f"+output_jsonl_fpath={output}", f"+num_repeats={repeats}", *shared,
        ]  # fmt: skip
        began = time.monotonic()
        with (scratch / f"collect-{impl}.log").open("wb") as log:
            result = subprocess.run(collect, cwd=scratch, env=gym_environment(scratch), stdout=log, stderr=subprocess.STDOUT, timeout=600)
        collect_s = time.monotonic() - began
        if result.returncode != 0:
            raise Failed(f"[{impl}] ng_collect_rollouts exited with {result.returncode}: {tail(scratch / f'collect-{impl}.log')}")
        checked += check_loopback_only(tag)
        call_ms = check_rollouts(output, captures, expected=5 * repeats, impl=impl)
        print(f"[{impl}] {len(call_ms)} rollouts in {collect_s:.1f} s; every row answered by {MODEL}, every capture read by Gym", flush=True)
        return Outcome(impl, len(call_ms), startup, collect_s, checked, call_ms)
    finally:
        stop_group(ng_run, signal.SIGINT, 30)  # ng_run's own shutdown: SIGINT to its servers, Ray down


def wait_ready(ng_run: subprocess.Popen[bytes], head_port: int, log_path: Path, timeout: float = 400) -> None:
    """ng_run marks its head server ready once every server answers and the model endpoint does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ng_run.poll() is not None:
            raise Failed(f"ng_run exited with {ng_run.returncode}: {tail(log_path)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{head_port}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise Failed(f"ng_run not ready within {timeout:.0f} s: {tail(log_path)}")


def check_rollouts(output: Path, captures: Path, expected: int, impl: str) -> list[float]:
    """The rows' checks; each rollout's model-call latency as its capture record says."""
    from nemo_gym.base_responses_api_model import CaptureStore, read_available_model_call_records

    rows = [json.loads(line) for line in output.read_text().splitlines() if line.strip()]
    failures = output.with_name(f"{output.stem}_failures.jsonl")
    if failures.exists() and failures.read_text().strip():
        raise Failed(f"[{impl}] failed rollouts in {failures}: {failures.read_text()[:2000]}")
    if len(rows) != expected:
        raise Failed(f"[{impl}] {len(rows)} rollouts, expected {expected}")
    store = CaptureStore(captures)
    latencies, late = [], []
    for row in rows:
        response = row.get("response")
        if not isinstance(response, dict) or not response.get("output"):
            raise Failed(f"[{impl}] a row without a response: {json.dumps(row)[:1000]}")
        if response.get("model") != MODEL:  # the fake upstream answers with the model it was sent
            raise Failed(f"[{impl}] the upstream was sent model {response.get('model')!r}, not {MODEL!r}")
        rollout_id = f"{row['_ng_task_index']}-{row['_ng_rollout_index']}"
        calls, invalid = read_available_model_call_records(store, rollout_id)
        if invalid or not calls or store.is_incomplete(rollout_id):
            raise Failed(f"[{impl}] rollout {rollout_id}: {len(calls)} capture records, {invalid} invalid")
        call = calls[-1]
        if call.status_code != 200 or call.model_ref is None or call.model_ref.name != "policy_model" or call.response_id != response.get("id"):
            raise Failed(f"[{impl}] rollout {rollout_id}: capture record {call.model_dump(exclude={'request', 'response'})}")
        merged = row.get("ng_model_call_capture") or {}
        if merged.get("gaps") or (merged.get("metrics") or {}).get("num_calls", 0) < 1:
            if impl == "relay_model":
                raise Failed(f"[{impl}] rollout {rollout_id}: the collector's merge of the capture: {merged.get('gaps')}")
            late.append(rollout_id)
        latencies.append(call.latency_total_ms)
    if late:  # seen once so far: Gym's server wrote a record after the collector had read the file
        print(f"[{impl}] the collector merged {len(late)} capture(s) before Gym's own server had written them "
              f"(rollouts {', '.join(late)}; the files are complete now): Gym's race, not counted as a failure")
    return latencies


def report(outcomes: list[Outcome]) -> None:
    print("\nmcqa rollouts through ng_run + ng_collect_rollouts, fake upstream, capture on:")
    print(f"{'model server':<14} {'rollouts':>8} {'ng_run ready':>13} {'collect wall':>13} {'rollouts/s':>11} {'model call p50 / p90':>21}")
    for o in outcomes:
        calls = sorted(o.call_ms)
        p50, p90 = calls[len(calls) // 2], calls[min(len(calls) - 1, int(len(calls) * 0.9))]
        print(f"{o.impl:<14} {o.rows:>8} {o.startup_s:>11.1f} s {o.collect_s:>11.1f} s {o.rows / o.collect_s:>11.1f} {p50:>10.2f} / {p90:.2f} ms")
    print("every listening socket of the run was on 127.0.0.1; nothing was left running")


if __name__ == "__main__":
    main()
