"""How long the relay blocks its event loop while it relays one big transfer, measured from outside.

A probe worker (`python -m bench.lag --worker --port P`) holds its own keep-alive connection to the relay
and sends GET /health back to back, one at a time, recording when each was sent and how long its answer
took. The relay answers /health on the event loop that relays the transfer, so while that loop is
blocked (orjson parsing a 16 MiB body, say) the probe in flight waits: the longest probe round trip
during the transfer, less the median round trip just before it (idle), estimates the longest stall. An
idle round trip is a fraction of a millisecond, so a stall is seen to within about one round trip.

The probe is its own process, not a task or thread of the runner: the runner sends and reads the big
transfer, and its own copying of megabytes would otherwise delay the probe and be counted as the relay's.
Both processes time with time.monotonic(), which on Linux is CLOCK_MONOTONIC, one clock for the whole
machine, so the probe's samples can be cut into the runner's windows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import select
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench import workload
from bench.loadgen import _read_line
from bench.procs import Processes
from bench.stats import median

TARGET_MS = 20.0  # the speed issue's target: no event-loop stall longer than this
REQUEST_BYTES = 16 * 2**20
EVENT_BYTES = 8 * 2**20
IDLE_SECONDS = 0.25  # probing before the transfer: the idle round trip it is compared with
# Probing after the last byte: the relay frees the megabytes it held once the response is sent, and
# freeing blocks the loop too.
MARGIN_SECONDS = 0.2
TRANSFER_TIMEOUT = 60.0
_PROBE_TIMEOUT = 30.0  # one probe round trip; a stall this long is a hang, not a figure
_READY = "ready"
_HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
_HEAD_END = b"\r\n\r\n"


@dataclass(frozen=True)
class Transfer:
    name: str
    endpoint: str
    body: bytes
    headers: dict[str, str]


def transfers() -> list[Transfer]:
    """The two big cases: a body the relay parses and re-serialises, and one event it only passes on."""
    event_headers = {**workload.headers(events=1), "x-fake-size": str(EVENT_BYTES)}
    return [
        Transfer(f"request body {REQUEST_BYTES // 2**20} MiB", "chat", workload.sized_body("chat", REQUEST_BYTES),
                 workload.HEADERS),
        Transfer(f"SSE event {EVENT_BYTES // 2**20} MiB", "chat", workload.body("chat", True), event_headers),
    ]  # fmt: skip


# --- the probe worker ----------------------------------------------------------------------


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=_PROBE_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise ValueError("no content-length in the /health answer")


def _round_trip(sock: socket.socket) -> tuple[float, float]:
    """One GET /health, read to its last byte: (sent at, seconds)."""
    sent = time.monotonic()
    sock.sendall(_HEALTH)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the relay closed the probe's connection")
        data += chunk
        head, found, body = data.partition(_HEAD_END)
        if found and len(body) >= _content_length(head):
            return sent, time.monotonic() - sent


def _probe_until_told(port: int, seconds: float, stdin: Any) -> dict[str, Any]:
    """Probe until a line arrives on stdin (or `seconds` pass, the bound if the runner never says)."""
    samples: list[tuple[float, float]] = []
    errors = 0
    deadline = time.monotonic() + seconds
    sock = _connect(port)
    try:
        _round_trip(sock)  # the connection's first request is not an idle round trip
        while time.monotonic() < deadline and not select.select([stdin], [], [], 0)[0]:
            try:
                samples.append(_round_trip(sock))
            except (OSError, ValueError):
                errors += 1  # a failed probe is no round trip; reconnect and go on
                sock.close()
                sock = _connect(port)
    finally:
        sock.close()
    return {"samples": samples, "errors": errors}


def _worker(port: int) -> None:
    """One probe window per `{"seconds": S}` line; the next line ends it. Exits when stdin closes."""
    # Unbuffered: select() must see a line the runner wrote, not one a buffer already swallowed.
    stdin = sys.stdin.buffer.raw
    print(_READY, flush=True)
    while line := stdin.readline():
        seconds = float(json.loads(line)["seconds"])
        reply = _probe_until_told(port, seconds, stdin)
        if not stdin.readline():  # the line that ended the window; none: the runner is gone
            return
        print(json.dumps(reply), flush=True)


# --- the runner's side ---------------------------------------------------------------------


class Probe:
    """The probe worker, started pinned where the runner says (beside the upstream, off the relay's core)."""

    def __init__(self, procs: Processes, cpus: frozenset[int], port: int) -> None:
        argv = [sys.executable, "-m", "bench.lag", "--worker", "--port", str(port)]
        self.proc = procs.start("lag-probe", argv, cpus, stdin_pipe=True, stdout_pipe=True)
        if _read_line(self.proc, 30.0).strip() != _READY:
            raise RuntimeError(f"the lag probe did not start:\n{self.proc.log_tail()}")

    def _say(self, line: str) -> None:
        stdin = self.proc.popen.stdin
        assert stdin is not None
        stdin.write(line.encode() + b"\n")
        stdin.flush()

    def begin(self, seconds: float) -> None:
        self._say(json.dumps({"seconds": seconds}))

    def end(self) -> dict[str, Any]:
        self._say("stop")
        return dict(json.loads(_read_line(self.proc, _PROBE_TIMEOUT + 10)))


def run_queue_seconds(pid: int) -> float:
    """Time the process's main thread (the relay's event loop) was ready to run but waited for a CPU."""
    with open(f"/proc/{pid}/schedstat", "rb") as stat:
        return int(stat.read().split()[1]) / 1e9


async def _transfer(url: str, transfer: Transfer) -> tuple[int, int]:
    """Send the request, read the answer to its end without keeping it: (status, bytes received)."""
    timeout = aiohttp.ClientTimeout(total=TRANSFER_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        async with session.post(url, data=transfer.body, headers=transfer.headers) as response:
            size = 0
            async for chunk in response.content.iter_any():
                size += len(chunk)
            return response.status, size


async def measure_transfer(probe: Probe, relay_pid: int, url: str, transfer: Transfer) -> dict[str, Any]:
    """One transfer through the relay with the probe running: idle first, then the transfer, then a margin."""
    probe.begin(IDLE_SECONDS + TRANSFER_TIMEOUT + MARGIN_SECONDS + 5)
    idle_from = time.monotonic()
    await asyncio.sleep(IDLE_SECONDS)
    waited0 = run_queue_seconds(relay_pid)
    started = time.monotonic()
    try:
        status, size = await _transfer(url, transfer)
        error = None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        status, size, error = 0, 0, type(exc).__name__
    finished = time.monotonic()
    await asyncio.sleep(MARGIN_SECONDS)
    waited = run_queue_seconds(relay_pid) - waited0
    reply = probe.end()
    return figures(reply, idle_from, started, finished + MARGIN_SECONDS) | {
        "status": status,
        "error": error,
        "bytes_sent": len(transfer.body),
        "bytes_received": size,
        "transfer_ms": (finished - started) * 1000,
        # Other load on the relay's core also delays the probe; this says how much of that there was.
        "relay_cpu_wait_ms": waited * 1000,
    }


def figures(reply: dict[str, Any], idle_from: float, started: float, until: float) -> dict[str, Any]:
    """Cut the probe's samples into the idle window and the transfer window (a probe counts if it overlaps)."""
    samples = [(sent, rtt) for sent, rtt in reply["samples"]]
    idle = sorted(rtt for sent, rtt in samples if sent >= idle_from and sent + rtt <= started)
    busy = [rtt for sent, rtt in samples if sent + rtt > started and sent < until]
    idle_p50 = median(idle) * 1000
    busy_max = max(busy) * 1000 if busy else math.nan
    return {
        "stall_ms": max(0.0, busy_max - idle_p50) if busy and idle else math.nan,
        "busy_max_ms": busy_max,
        "idle_p50_ms": idle_p50,
        "idle_max_ms": idle[-1] * 1000 if idle else math.nan,
        "probes_idle": len(idle),
        "probes_busy": len(busy),
        "probe_errors": reply["errors"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lag", description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="serve probe windows on stdin (used by bench.run)")
    parser.add_argument("--port", type=int, required=True, help="the relay's port on 127.0.0.1")
    args = parser.parse_args(argv)
    if not args.worker:
        parser.error("only --worker is supported: bench.run drives the probe")
    _worker(args.port)


if __name__ == "__main__":
    main()
