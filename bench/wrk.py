"""Drive `wrk` (when installed): a C load generator, so the generator is rarely the bottleneck.

wrk is closed-loop and keep-alive by design. A generated Lua script sets the POST body and headers and
prints one machine-readable line from wrk's `done` hook; wrk's CPU comes from wait4() on its PID.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from bench.loadgen import LoadResult, LoadSpec
from bench.procs import Processes, wait_child_rusage

_MARK = "BENCH_JSON "
_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,'
    .. '"p50":%d,"p90":%d,"p99":%d,"max":%d}\\n',
    "{mark}", summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def available() -> str | None:
    return shutil.which("wrk")


def _lua_string(text: str) -> str:
    level = 0
    while f"]{'=' * level}]" in text:  # pick a long-bracket level that the text cannot close
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"


def _script(spec: LoadSpec) -> str:
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(spec.body.decode())}"]
    for name, value in spec.headers.items():
        lines.append(f"wrk.headers[ {_lua_string(name)} ] = {_lua_string(value)}")  # spaces: `[[[` would not parse
    return "\n".join(lines) + _DONE.replace("{mark}", _MARK)


class WrkGenerator:
    name = "wrk"

    def __init__(self, procs: Processes, cpus: frozenset[int], work_dir: Path) -> None:
        binary = available()
        if binary is None:
            raise RuntimeError("wrk is not installed")
        self.binary = binary
        self.procs = procs
        self.cpus = cpus
        self.threads = max(1, len(cpus))
        self.work_dir = work_dir
        self._runs = 0
        probe = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
        banner = (probe.stdout + probe.stderr).splitlines()
        self.version = banner[0].split(" Copyright")[0] if banner else "wrk"

    def run(self, spec: LoadSpec) -> LoadResult:
        self._runs += 1
        script = self.work_dir / f"wrk-{self._runs}.lua"
        script.write_text(_script(spec))
        threads = min(self.threads, spec.concurrency)
        # wrk takes whole seconds only; SIGINT makes it stop early and report over the time it really ran,
        # so any duration works: -d is only the backstop.
        argv = [
            self.binary, f"-t{threads}", f"-c{spec.concurrency}", f"-d{math.ceil(spec.duration) + 1}s",
            f"--timeout={math.ceil(spec.timeout)}s", "-s", str(script), spec.url,
        ]  # fmt: skip
        proc = self.procs.start(f"wrk-{self._runs}", argv, self.cpus)
        try:
            time.sleep(spec.duration)
            if proc.popen.poll() is None:
                os.kill(proc.pid, signal.SIGINT)
            code, cpu = wait_child_rusage(proc.popen, spec.timeout + 30)
        finally:
            self.procs.stop(proc)
        output = proc.log_path.read_text(errors="replace")
        line = next((x for x in output.splitlines() if x.startswith(_MARK)), None)
        if code != 0 or line is None:
            raise RuntimeError(f"wrk failed (exit {code}):\n{output[-2000:]}")
        proc.log_path.unlink(missing_ok=True)
        script.unlink(missing_ok=True)
        raw = json.loads(line[len(_MARK) :])
        errors = {k: raw[k] for k in ("connect", "read", "write", "status", "timeout") if raw[k]}
        # wrk counts a non-2xx/3xx answer both as a request and as a status error; `ok` is the rest.
        return LoadResult(
            generator=self.name,
            ok=raw["requests"] - raw["status"],
            seconds=raw["duration_us"] / 1e6,
            errors=errors,
            latency={f"{k}_ms": raw[k] / 1000 for k in ("p50", "p90", "p99", "max")},
            cpu_seconds=cpu,
        )
