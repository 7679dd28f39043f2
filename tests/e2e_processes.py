"""Processes and sockets of `make test-nemo-gym` (tests/nemo_gym_e2e.py): every process the run starts
carries an environment tag, so it is found wherever it was reparented (Ray's included), checked for
listening sockets off loopback, and stopped by PID."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

TAG_ENV = "RELAY_E2E_TAG"
_USERS = re.compile(r"pid=(\d+)")


class Failed(Exception):
    pass


def tagged_pids(tag: str) -> set[int]:
    """Every live process that inherited this run's tag, wherever it was reparented."""
    found = set()
    needle = f"{TAG_ENV}={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.add(int(entry.name))
        except OSError:
            continue
    return found


def check_loopback_only(tag: str) -> int:
    """Fails if a listening TCP or UDP socket of this run's processes is on a non-loopback address."""
    ours = tagged_pids(tag)
    listing = subprocess.run(["ss", "-Hltunp"], capture_output=True, text=True, timeout=30, check=True).stdout
    checked = 0
    for line in listing.splitlines():
        fields = line.split()
        pids = {int(pid) for pid in _USERS.findall(line)}
        if len(fields) < 5 or not pids & ours:
            continue
        checked += 1
        host = fields[4].rsplit(":", 1)[0].strip("[]").split("%", 1)[0]
        if not (host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1") or host.startswith("::ffff:127.")):
            raise Failed(f"a socket of this run listens on {fields[4]}: {line}")
    if checked == 0:
        raise Failed("ss showed no listening socket of this run's processes: the check would prove nothing")
    print(f"  {checked} listening sockets of {len(ours)} processes, all on loopback", flush=True)
    return checked


def stop_group(process: subprocess.Popen[bytes], first: int, grace: float) -> None:
    """Stop a process started in its own session, and its group: `first`, then SIGKILL after `grace`."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, first)
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def stop_tagged(tag: str) -> list[int]:
    """Kill, by PID, whatever this run started that is still alive (a Ray worker that outlived its
    raylet, say); return their PIDs."""
    deadline = time.monotonic() + 15
    while (left := sorted(tagged_pids(tag))) and time.monotonic() < deadline:
        time.sleep(0.5)  # processes on their way out after ng_run's shutdown
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"
