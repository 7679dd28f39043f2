"""Start, pin, measure and stop the benchmark's processes.

Every process the benchmark starts goes through `Processes`, which stops them by PID (terminate, wait,
kill) in reverse order from a `finally`, so an interrupted run leaves nothing behind. Each child also asks
the kernel to send it SIGTERM when the benchmark dies without running its `finally` (SIGKILL, OOM).
CPU figures come from /proc, which is where `top` gets them too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from relay.testing.ports import free_port as free_port  # re-exported for bench.run

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1
_STOP_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class Cores:
    """Which CPUs the code under test gets, and which the upstream and the load generator share."""

    under_test: frozenset[int]  # the relay, the floor app, the floor client loop
    others: frozenset[int]  # the upstream, the load generator, this process
    pinned: bool

    @staticmethod
    def plan() -> Cores:
        available = sorted(os.sched_getaffinity(0))
        if len(available) < 2:
            # One core cannot be split; measure anyway, and say so in the report.
            everything = frozenset(available)
            return Cores(everything, everything, pinned=False)
        return Cores(frozenset(available[-1:]), frozenset(available[:-1]), pinned=True)


def _child_setup(cpus: frozenset[int] | None) -> Callable[[], None]:
    def setup() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        # Linux only; elsewhere the `finally` of the runner is the only guard.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return setup


class Proc:
    """One child process with a log file; CPU and RSS read from /proc by PID."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        cpus: frozenset[int] | None,
        env: dict[str, str] | None = None,
        stdin_pipe: bool = False,
        stdout_pipe: bool = False,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log,
            env=env,
            preexec_fn=_child_setup(cpus),  # safe: the runner has no other threads when it spawns
            # Its own session: Ctrl-C reaches only the runner, whose `finally` then stops everyone in order.
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        # With its descendants: should a server ever run its work in child processes, that work counts.
        return sum(_alive_or_zero(cpu_seconds, pid) for pid in tree(self.pid))

    def rss_bytes(self) -> int:
        return int(sum(_alive_or_zero(rss_bytes, pid) for pid in tree(self.pid)))

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(_STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(_STOP_GRACE_SECONDS)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                stream.close()
        self._log.close()


class Processes:
    """Everything started for one run; `stop_all` is called from a `finally`."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], cpus: frozenset[int] | None, **kwargs: object) -> Proc:
        proc = Proc(name, argv, self.log_dir / f"{name}.log", cpus, **kwargs)  # type: ignore[arg-type]
        self._procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        while self._procs:
            proc = self._procs.pop()
            try:
                proc.stop()
            except Exception as exc:  # one stubborn child must not leave the others running
                print(f"bench: could not stop {proc.name} (pid {proc.pid}): {exc}")


def wait_listening(port: int, proc: Proc, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s:\n{proc.log_tail()}")


def tree(pid: int) -> list[int]:
    """The process and its live descendants (bounded: a process tree here is a handful of PIDs)."""
    found: list[int] = []
    queue = [pid]
    while queue and len(found) < 1000:
        current = queue.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    queue.extend(int(child) for child in children.read().split())
        except OSError:  # gone meanwhile, or a kernel without the children file
            continue
    return found


def _alive_or_zero(read: Callable[[int], float], pid: int) -> float:
    try:
        return read(pid)
    except (OSError, IndexError, ValueError):  # exited between listing and reading
        return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the whole process (all threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        # The command name may contain spaces and parentheses; the fields after the last ')' do not.
        fields = stat.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14 and 15 of proc(5))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def core_busy_seconds(cpus: frozenset[int]) -> float:
    """CPU time spent busy (anything but idle and iowait) on these cores by every process on the machine."""
    total = 0
    with open("/proc/stat", "rb") as stat:
        for line in stat:
            name, *values = line.split()
            if not name.startswith(b"cpu") or name == b"cpu":
                continue
            if int(name[3:]) in cpus:
                numbers = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
                total += sum(numbers) - numbers[3] - numbers[4]
    return total / _CLK_TCK


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's open-file limit (children inherit it) towards `wanted`; return what it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    for target_hard in (max(hard, wanted), hard):
        try:  # raising the hard limit needs root (CAP_SYS_RESOURCE); raising soft up to hard does not
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, target_hard), target_hard))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def wait_child_rusage(popen: subprocess.Popen[bytes], timeout: float) -> tuple[int, float]:
    """Wait for a child (bounded) and return its exit status and user + system CPU seconds from wait4()."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(popen.pid, os.WNOHANG)
        if pid:
            popen.returncode = os.waitstatus_to_exitcode(status)
            return popen.returncode, usage.ru_utime + usage.ru_stime
        if time.monotonic() >= deadline:
            popen.kill()
            _, status, usage = os.wait4(popen.pid, 0)
            popen.returncode = os.waitstatus_to_exitcode(status)
            raise TimeoutError(f"pid {popen.pid} did not finish within {timeout:.0f} s; killed")
        time.sleep(0.01)
