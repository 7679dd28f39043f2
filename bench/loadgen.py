"""The Python load generator: closed-loop, keep-alive aiohttp clients, bounded in time.

It is the fallback when `wrk` is not installed, and the aiohttp client loop of the floor measurement.
It runs as long-lived worker processes (`python -m bench.loadgen --worker`) that take one JSON command per
line on stdin and answer one JSON line: a process can be pinned to a core and its CPU measured on its own,
and a run pays the interpreter's start-up once, not once per measurement. Several workers split the
concurrency when one process would be the bottleneck (`--gen-procs`).

Standalone: `python -m bench.loadgen --url http://127.0.0.1:9000/v1/chat/completions -c 64 -d 5`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import select
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.procs import Cores, Proc, Processes
from bench.stats import latency_summary

_READY = "ready"
_REPLY_GRACE_SECONDS = 30.0
_ERROR_BACKOFF_SECONDS = 0.01  # a refused connection must not turn a worker into a busy loop


@dataclass(frozen=True)
class LoadSpec:
    url: str
    body: bytes
    headers: dict[str, str]
    concurrency: int
    duration: float
    timeout: float = 10.0  # one request's limit; slower ones count as timeouts


@dataclass
class LoadResult:
    generator: str
    ok: int  # 2xx responses completed inside the window
    seconds: float
    errors: dict[str, int] = field(default_factory=dict)  # status (non-2xx), connect, read, timeout
    latency: dict[str, float] = field(default_factory=dict)  # p50_ms, p90_ms, p99_ms, max_ms
    cpu_seconds: float = 0.0  # the generator's own CPU over the run

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


async def closed_loop(spec: LoadSpec) -> dict[str, Any]:
    """`concurrency` clients, each sending its next request when the previous answer is fully read."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    ok = 0
    cpu_start = time.process_time()
    connector = aiohttp.TCPConnector(limit=spec.concurrency)
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=spec.timeout),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )
    start = time.perf_counter()
    deadline = start + spec.duration

    async def client() -> None:
        nonlocal ok
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            try:
                async with session.post(spec.url, data=spec.body, headers=spec.headers) as response:
                    await response.read()
                    status = response.status
            except TimeoutError:
                errors["timeout"] += 1
                continue
            except aiohttp.ClientConnectorError:
                errors["connect"] += 1
                await asyncio.sleep(_ERROR_BACKOFF_SECONDS)
                continue
            except (aiohttp.ClientError, OSError):
                errors["read"] += 1
                await asyncio.sleep(_ERROR_BACKOFF_SECONDS)
                continue
            done = time.perf_counter()
            if done > deadline:
                return  # finished after the window closed: like wrk, not counted
            if 200 <= status < 300:
                ok += 1
                latencies.append(done - sent)
            else:
                errors["status"] += 1

    try:
        tasks = [asyncio.create_task(client()) for _ in range(spec.concurrency)]
        # The window is the duration: what is still in flight then is cancelled, not waited for.
        _, pending = await asyncio.wait(tasks, timeout=spec.duration)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        await session.close()
    return {
        "ok": ok,
        "seconds": spec.duration,
        "errors": dict(errors),
        "latencies_us": [round(x * 1e6) for x in latencies],
        "cpu_seconds": time.process_time() - cpu_start,
    }


def _spec_from(command: dict[str, Any]) -> LoadSpec:
    return LoadSpec(
        url=command["url"],
        body=command["body"].encode(),
        headers=command["headers"],
        concurrency=command["concurrency"],
        duration=command["duration"],
        timeout=command["timeout"],
    )


def _worker() -> None:
    """Answer one JSON command per stdin line until stdin closes (the runner closes it, or dies)."""
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    print(_READY, flush=True)
    for line in sys.stdin:
        spec = _spec_from(json.loads(line))
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            reply = runner.run(closed_loop(spec))
        print(json.dumps(reply), flush=True)


class PythonGenerator:
    """Worker processes driven from the runner; each gets an equal share of the concurrency."""

    name = "python-aiohttp"

    def __init__(self, procs: Processes, cpus: frozenset[int] | None, count: int = 1, label: str = "loadgen") -> None:
        argv = [sys.executable, "-m", "bench.loadgen", "--worker"]
        self.workers = [
            procs.start(f"{label}{i}", argv, cpus, stdin_pipe=True, stdout_pipe=True) for i in range(max(1, count))
        ]
        for worker in self.workers:
            if _read_line(worker, 30.0).strip() != _READY:
                raise RuntimeError(f"{worker.name} did not start:\n{worker.log_tail()}")

    @property
    def version(self) -> str:
        return f"aiohttp {aiohttp.__version__}, {len(self.workers)} process(es)"

    @property
    def pids(self) -> list[int]:
        return [worker.pid for worker in self.workers]

    def run(self, spec: LoadSpec) -> LoadResult:
        shares = [spec.concurrency // len(self.workers)] * len(self.workers)
        for i in range(spec.concurrency % len(self.workers)):
            shares[i] += 1
        busy: list[Proc] = []
        for worker, share in zip(self.workers, shares, strict=True):
            if share == 0:
                continue
            command = {
                "url": spec.url,
                "body": spec.body.decode(),
                "headers": spec.headers,
                "concurrency": share,
                "duration": spec.duration,
                "timeout": spec.timeout,
            }
            assert worker.popen.stdin is not None
            worker.popen.stdin.write((json.dumps(command) + "\n").encode())
            worker.popen.stdin.flush()
            busy.append(worker)
        replies = [json.loads(_read_line(w, spec.duration + spec.timeout + _REPLY_GRACE_SECONDS)) for w in busy]
        latencies = [us / 1e6 for reply in replies for us in reply["latencies_us"]]
        errors: Counter[str] = Counter()
        for reply in replies:
            errors.update(reply["errors"])
        return LoadResult(
            generator=self.name,
            ok=sum(reply["ok"] for reply in replies),
            seconds=spec.duration,
            errors=dict(errors),
            latency=latency_summary(latencies),
            cpu_seconds=sum(reply["cpu_seconds"] for reply in replies),
        )


def _read_line(proc: Proc, timeout: float) -> str:
    stdout = proc.popen.stdout
    assert stdout is not None
    ready, _, _ = select.select([stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"{proc.name} gave no answer within {timeout:.0f} s:\n{proc.log_tail()}")
    line = stdout.readline().decode()
    if not line:
        raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
    return line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="serve JSON commands on stdin (used by bench.run)")
    parser.add_argument("--url", help="a 127.0.0.1 URL to POST to")
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    parser.add_argument("-d", "--duration", type=float, default=5.0)
    parser.add_argument("--body", default='{"model": "bench-model", "messages": [{"role": "user", "content": "hi"}]}')
    parser.add_argument("-H", "--header", action="append", default=[], help="name: value")
    parser.add_argument("--procs", type=int, default=1)
    args = parser.parse_args(argv)
    if args.worker:
        _worker()
        return
    if not args.url or not args.url.startswith("http://127.0.0.1:"):
        parser.error("--url must be an http://127.0.0.1:PORT/... URL")
    headers = {"Content-Type": "application/json"}
    for item in args.header:
        name, _, value = item.partition(":")
        headers[name.strip()] = value.strip()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="bench-loadgen-") as tmp:
        procs = Processes(Path(tmp))
        try:
            generator = PythonGenerator(procs, Cores.plan().others, args.procs)
            spec = LoadSpec(args.url, args.body.encode(), headers, args.concurrency, args.duration)
            result = generator.run(spec)
        finally:
            procs.stop_all()
    print(json.dumps({**result.__dict__, "rps": result.rps}, indent=2))


if __name__ == "__main__":
    main()
