"""The cluster row of `make bench`: what the cluster-wide cap (`cluster:` on a local redis-server, which
this run starts on a free port) costs over the per-process cap (`max_concurrent_requests`): two more
relays, the same cap on each, pinned like the main one, measured with the same load in the same run,
interleaved. The cap is above the load's concurrency, so the row shows the bookkeeping (a round trip to
Redis to admit, one to release, batched), not waiting for a slot. redis-server runs on the core of the
upstream and the load generator, which they keep nearly saturated: its answers wait there for the CPU,
so the added latency is an upper bound (Redis on a host of its own answers in a fraction of a ms)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from bench.procs import Cores, Proc, Processes, free_port, wait_listening
from bench.stats import median

CAP = 256
CONCURRENCY = 64
MODES = ("process_cap", "cluster_cap")
_LIMITS = {
    "process_cap": f"max_concurrent_requests: {CAP}\n",
    "cluster_cap": "cluster:\n  redis_url: ${bench_redis_url}\n  name: bench\n" f"  max_concurrent_requests: {CAP}\n",
}


class ClusterRow:
    def __init__(self, procs: Processes, cores: Cores, work: Path) -> None:
        self.procs = procs
        self.cores = cores
        self.work = work
        self.ports = {mode: free_port() for mode in MODES}
        self.relays: dict[str, Proc] = {}
        self.skipped: str | None = None

    def start(self, config: str, env_file: Path) -> None:
        """`config` and `env_file`: the main relay's, which these two extend."""
        binary = shutil.which("redis-server")
        if binary is None:
            self.skipped = "redis-server is not installed"
            return
        redis_port = free_port()
        redis = self.procs.start(
            "redis", [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            self.cores.others,
        )  # fmt: skip
        wait_listening(redis_port, redis)
        env = env_file.read_text() + f"bench_redis_url: redis://127.0.0.1:{redis_port}/0\n"
        for mode in MODES:
            (self.work / f"{mode}.yaml").write_text(config + _LIMITS[mode])
            (self.work / f"{mode}.env.yaml").write_text(env)
            argv = [sys.executable, "-m", "relay", "serve", "--config", str(self.work / f"{mode}.yaml"),
                    "--env-file", str(self.work / f"{mode}.env.yaml"), "--port", str(self.ports[mode]), "--workers", "1"]  # fmt: skip
            self.relays[mode] = self.procs.start(f"relay ({mode.replace('_', ' ')})", argv, self.cores.under_test)
        for mode in MODES:
            wait_listening(self.ports[mode], self.relays[mode])


def figures(runs: dict[tuple[Any, ...], list[dict[str, Any]]], skipped: str | None) -> dict[str, Any]:
    """The row: each mode's medians, and what the cluster cap adds to CPU per request and to p50."""
    if skipped is not None or ("cluster", "cluster_cap") not in runs:
        return {"skipped": skipped or "not measured"}
    medians = {mode: {key: median([run[key] for run in runs[("cluster", mode)]]) for key in ("cpu_us_per_req", "p50_ms", "p99_ms", "rps", "errors")} for mode in MODES}
    process, cluster = medians["process_cap"], medians["cluster_cap"]
    return {
        "cap": CAP,
        "concurrency": CONCURRENCY,
        **medians,
        "cpu_us_added": cluster["cpu_us_per_req"] - process["cpu_us_per_req"],
        "p50_ms_added": cluster["p50_ms"] - process["p50_ms"],
        "runs": {mode: runs[("cluster", mode)] for mode in MODES},
    }


def line(row: dict[str, Any] | None) -> str:
    if not row or "skipped" in row:
        return f"Cluster-wide cap: skipped ({(row or {}).get('skipped', 'not measured')})"
    process, cluster = row["process_cap"], row["cluster_cap"]
    return (
        f"Cluster-wide cap (cluster: on a local redis-server sharing the upstream's core, cap {row['cap']}, chat "
        f"c={row['concurrency']}): relay CPU "
        f"{cluster['cpu_us_per_req']:,.0f} us/req vs {process['cpu_us_per_req']:,.0f} with the per-process cap "
        f"({row['cpu_us_added']:+,.0f} us); p50 {cluster['p50_ms']:.2f} vs {process['p50_ms']:.2f} ms "
        f"({row['p50_ms_added']:+.2f} ms); {cluster['rps']:,.0f} vs {process['rps']:,.0f} req/s; errors "
        f"{cluster['errors']:.0f}/{process['errors']:.0f}"
    )
