"""One throughput measurement with its accounting: who used how much CPU, and what the limit was.

Around each load run the CPU of the process under test and of the upstream are read from /proc, and so
is the busy time of each core group. The process under test is pinned alone to its core, so what its core
spent beyond that process's own CPU is other load on the machine: noise, reported rather than hidden.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from bench.loadgen import LoadResult, LoadSpec
from bench.procs import Cores, Proc, core_busy_seconds

SATURATED = 0.90  # a process or core this busy is where the throughput figure is limited


class Generator(Protocol):
    name: str

    def run(self, spec: LoadSpec) -> LoadResult: ...


def measure(
    generator: Generator,
    spec: LoadSpec,
    cores: Cores,
    upstream: Proc,
    under_test: Proc | None,
    generator_on_test_core: bool = False,
) -> dict[str, Any]:
    """Run one load and return its figures; `under_test` is None when the client talks to the upstream.

    `generator_on_test_core` is for the floor's client loop, which runs where the relay would."""
    test_cpu0 = under_test.cpu_seconds() if under_test else 0.0
    upstream_cpu0 = upstream.cpu_seconds()
    self_cpu0 = time.process_time()
    test_core0 = core_busy_seconds(cores.under_test)
    other_cores0 = core_busy_seconds(cores.others)
    started = time.monotonic()
    result = generator.run(spec)
    wall = time.monotonic() - started
    test_cpu = (under_test.cpu_seconds() - test_cpu0) if under_test else 0.0
    upstream_cpu = upstream.cpu_seconds() - upstream_cpu0
    self_cpu = time.process_time() - self_cpu0
    test_core = core_busy_seconds(cores.under_test) - test_core0
    other_cores = core_busy_seconds(cores.others) - other_cores0
    ok = max(result.ok, 1)
    n_others = len(cores.others)
    gen_on_others = 0.0 if generator_on_test_core else result.cpu_seconds
    figures: dict[str, Any] = {
        "rps": result.rps,
        "ok": result.ok,
        "errors": result.error_count,
        "error_kinds": result.errors,
        **result.latency,
        "seconds": result.seconds,
        "wall_seconds": wall,
        "gen_cpu_seconds": result.cpu_seconds,
        "gen_cpu_pct": 100 * result.cpu_seconds / wall / (1 if generator_on_test_core else n_others),
        "upstream_cpu_pct": 100 * upstream_cpu / wall,
        "upstream_cpu_us_per_req": 1e6 * upstream_cpu / ok,
        # Busy share of the upstream+generator core(s), and the part of it that was none of ours.
        "others_core_pct": 100 * other_cores / wall / n_others,
        "others_noise_pct": max(0.0, 100 * (other_cores - gen_on_others - upstream_cpu - self_cpu) / wall / n_others),
    }
    if under_test is not None:
        figures.update(
            cpu_us_per_req=1e6 * test_cpu / ok,
            cpu_pct=100 * test_cpu / wall,
            rss_mib=under_test.rss_bytes() / 2**20,
        )
    if cores.pinned:
        # On the core under test nothing of ours runs but the process under test (if any).
        ours = test_cpu + (result.cpu_seconds if generator_on_test_core else 0.0)
        figures["noise_pct"] = max(0.0, 100 * (test_core - ours) / wall)
    figures["bottleneck"] = bottleneck(figures, under_test.name if under_test else None)
    return figures


def bottleneck(figures: dict[str, Any], tested: str | None) -> str:
    """Name what limited this figure: the first resource found saturated, in the order that explains most."""
    if tested and figures.get("cpu_pct", 0) >= 100 * SATURATED:
        return f"{tested} CPU"
    if figures["gen_cpu_pct"] >= 100 * SATURATED:
        return "generator CPU"
    if figures["others_core_pct"] >= 100 * SATURATED:
        # Saturated by our own upstream and generator, or mostly by someone else's processes?
        ours = figures["others_core_pct"] - figures["others_noise_pct"]
        return "upstream+generator core" if ours >= figures["others_noise_pct"] else "generator core (other load)"
    if figures.get("noise_pct", 0) + figures.get("cpu_pct", 0) >= 100 * SATURATED:
        return f"{tested or 'tested'} core (other load)"
    return "none (latency-bound)"
