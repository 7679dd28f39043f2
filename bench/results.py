"""From raw runs to the figures a reader quotes: medians of repeats, ratios relay/direct, warnings.

Pure functions over plain dicts, so the JSON holds both every run and every derived figure.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from bench import cluster
from bench.stats import median, percentile, ratio
from bench.streams import StreamTiming

NOISY_PCT = 10.0
# The relay waiting this long for its CPU during a stall measurement (other load on its core) may be
# most of the stall it shows: a quarter of the 20 ms target.
NOISY_WAIT_MS = 5.0
_PCTS = ("p50", "p90", "p99")  # other load on the relay's core above this makes a figure noisy


def fidelity_figures(timings: list[StreamTiming]) -> dict[str, Any]:
    ok = [t for t in timings if t.ok]
    ttfb = sorted(t.ttfb for t in ok)
    gaps = sorted(gap for t in ok for gap in t.gaps())
    problems = Counter(t.error or f"status {t.status}" for t in timings if not t.ok)
    return {
        "streams": len(timings),
        "ok": len(ok),
        "ttfb_p50_ms": percentile(ttfb, 50) * 1000,
        "ttfb_max_ms": (ttfb[-1] * 1000) if ttfb else math.nan,
        "gap_p50_ms": percentile(gaps, 50) * 1000,
        "gap_max_ms": (gaps[-1] * 1000) if gaps else math.nan,
        "events": sorted({len(t.events) for t in ok}),
        "digests": sorted({t.digest for t in ok}),
        "problems": dict(problems),
    }


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each number over the repeats; the most frequent value of each label."""
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [run.get(key) for run in runs]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = median(values)
        elif all(isinstance(v, str) for v in values):
            out[key] = Counter(values).most_common(1)[0][0]
    return out


def _pair(runs: dict[tuple[Any, ...], list[dict[str, Any]]], *key: Any) -> dict[str, Any]:
    relay, direct = runs[(*key, "relay")], runs[(*key, "direct")]
    r, d = _medians(relay), _medians(direct)
    return {  # ratios first: they are what survives a change of machine
        "ratio": {"rps": ratio(r["rps"], d["rps"]), **{p: ratio(r[f"{p}_ms"], d[f"{p}_ms"]) for p in _PCTS}},
        "added_ms": {p: r[f"{p}_ms"] - d[f"{p}_ms"] for p in _PCTS},
        "relay": {"median": r, "runs": relay},
        "direct": {"median": d, "runs": direct},
    }


def _fidelity(runs: dict[tuple[Any, ...], list[dict[str, Any]]], endpoint: str, streams: int) -> dict[str, Any]:
    relay, direct = runs[("fidelity", endpoint, streams, "relay")], runs[("fidelity", endpoint, streams, "direct")]
    r, d = _medians(relay), _medians(direct)
    direct_digests = {x for run in direct for x in run["digests"]}
    relay_digests = {x for run in relay for x in run["digests"]}
    return {
        "endpoint": endpoint,
        "streams": streams,
        "relay": {"median": r, "runs": relay},
        "direct": {"median": d, "runs": direct},
        "ttfb_added_ms": r["ttfb_p50_ms"] - d["ttfb_p50_ms"],
        "gap_added_p50_ms": r["gap_p50_ms"] - d["gap_p50_ms"],
        "gap_added_max_ms": r["gap_max_ms"] - d["gap_max_ms"],
        "all_ok": all(run["ok"] == run["streams"] for run in relay + direct),
        "identical": len(direct_digests) == 1 and relay_digests == direct_digests,
    }


def assemble(
    runs: dict[tuple[Any, ...], list[dict[str, Any]]],
    extra: dict[str, Any],
    settings: dict[str, Any],
    machine: dict[str, Any],
    relay_log_warnings: list[str],
    cluster_skipped: str | None = None,
) -> dict[str, Any]:
    throughput: dict[str, list[dict[str, Any]]] = {"nonstream": [], "stream": []}
    for key in sorted({k[:3] for k in runs if k[0] in throughput}, key=lambda k: (k[0], k[1], k[2])):
        kind, endpoint, concurrency = key
        throughput[kind].append({"endpoint": endpoint, "concurrency": concurrency, **_pair(runs, *key)})
    fidelity = [_fidelity(runs, e, n) for (_, e, n) in sorted({k[:3] for k in runs if k[0] == "fidelity"})]
    outcome: dict[str, Any] = {
        "machine": machine,
        "settings": settings,
        "relay_idle_rss_mib_at_start": extra.get("relay_idle_rss_mib_at_start"),
        "nonstream": throughput["nonstream"],
        "stream": throughput["stream"],
        "floor": _floor(runs, throughput["nonstream"]),
        "fidelity": fidelity,
        "event_loop_lag": _lag(runs, settings.get("lag", {}).get("target_ms", math.nan)),
        "identity": extra.get("identity", {}),
        "many_streams": extra.get("many_streams"),
        "nginx": _peer(runs, extra.get("nginx"), throughput),
        "fleet": _fleet(runs, extra.get("fleet"), throughput["nonstream"]),
        "cluster": cluster.figures(runs, cluster_skipped),
        "relay_log_warnings": relay_log_warnings[:50],
    }
    outcome["warnings"] = warnings(outcome)
    return outcome


def _fleet(runs: dict[tuple[Any, ...], list[dict[str, Any]]], extra: dict[str, Any] | None, nonstream: list[dict[str, Any]]) -> dict[str, Any]:
    """Three upstreams against one: relay CPU per request at c=64, the drill, the affinity hit rates."""
    key = ("fleet", "chat", 64, "relay3")
    if key not in runs:
        return {}
    three = _medians(runs[key])
    one = next((c["relay"]["median"] for c in nonstream if c["endpoint"] == "chat" and c["concurrency"] == 64), None)
    single_us = one["cpu_us_per_req"] if one else math.nan
    return {
        "three_upstreams": {"median": three, "runs": runs[key]},
        "cpu_us_per_req": {"one": single_us, "three": three["cpu_us_per_req"]},
        "routing_cost_ratio": ratio(three["cpu_us_per_req"], single_us),
        **(extra or {}),
    }


def _floor(runs: dict[tuple[Any, ...], list[dict[str, Any]]], nonstream: list[dict[str, Any]]) -> dict[str, Any]:
    if ("floor", "app") not in runs:
        return {}
    app, client = _medians(runs[("floor", "app")]), _medians(runs[("floor", "client")])
    floor_us = app["cpu_us_per_req"] + client["cpu_us_per_req"]
    relay_us = {
        cell["endpoint"]: cell["relay"]["median"]["cpu_us_per_req"] for cell in nonstream if cell["concurrency"] == 64
    }
    return {
        "app": {"median": app, "runs": runs[("floor", "app")]},
        "client": {"median": client, "runs": runs[("floor", "client")]},
        "app_cpu_us_per_req": app["cpu_us_per_req"],
        "client_cpu_us_per_req": client["cpu_us_per_req"],
        "floor_cpu_us_per_req": floor_us,
        "relay_cpu_us_per_req_c64": relay_us,
        "relay_over_floor": {endpoint: ratio(us, floor_us) for endpoint, us in relay_us.items()},
    }


def _lag(runs: dict[tuple[Any, ...], list[dict[str, Any]]], target_ms: float) -> list[dict[str, Any]]:
    """Per big transfer: the median and the worst of the per-repeat stalls, and whether the worst meets the target."""
    cells = []
    for key in [k for k in runs if k[0] == "lag"]:  # in the order measured: the body, then the event
        repeats = runs[key]
        stalls = [run["stall_ms"] for run in repeats]
        worst = max((s for s in stalls if not math.isnan(s)), default=math.nan)
        failed = any(run["status"] != 200 or not run["probes_busy"] for run in repeats)
        cells.append({
            "transfer": key[1],
            "stall_median_ms": median(stalls),
            "stall_max_ms": worst,
            # A failed repeat has no stall figure, so no verdict either.
            "within_target": None if failed or math.isnan(worst) else worst <= target_ms,
            "median": _medians(repeats),
            "runs": repeats,
        })  # fmt: skip
    return cells


def _peer(
    runs: dict[tuple[Any, ...], list[dict[str, Any]]],
    info: dict[str, Any] | None,
    throughput: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """nginx beside the relay and direct figures of the same cell and the same run."""
    out = dict(info or {"skipped": "not measured"})
    if "skipped" in out:
        return out
    cells = []
    for key in sorted(k for k in runs if k[0] == "nginx"):
        _, kind, endpoint, concurrency = key
        peer_runs = runs[key]
        m = _medians(peer_runs)
        cell: dict[str, Any] = {"kind": kind, "endpoint": endpoint, "concurrency": concurrency, "median": m,
                                "runs": peer_runs}  # fmt: skip
        same = next((c for c in throughput[kind] if (c["endpoint"], c["concurrency"]) == (endpoint, concurrency)), None)
        if same is not None:
            relay, direct = same["relay"]["median"], same["direct"]["median"]
            cell.update(
                direct_rps=direct["rps"],
                relay_rps=relay["rps"],
                nginx_over_direct=ratio(m["rps"], direct["rps"]),
                relay_over_nginx=ratio(relay["rps"], m["rps"]),
                relay_cpu_us_per_req=relay["cpu_us_per_req"],
            )
        cells.append(cell)
    out["cells"] = cells
    return out


def warnings(outcome: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if not outcome["settings"]["cores"]["pinned"]:
        out.append("fewer than 2 cores: nothing is pinned, the relay shares its core with the upstream and generator")
    noisy: list[str] = []
    runs = 0
    for kind in ("nonstream", "stream"):
        for cell in outcome[kind]:
            where = f"{'stream' if kind == 'stream' else 'non-stream'} {cell['endpoint']} c={cell['concurrency']}"
            for mode in ("relay", "direct"):
                m = cell[mode]["median"]
                if m["bottleneck"] == "generator CPU":
                    out.append(
                        f"{where} {mode}: generator-bound (generator at {m['gen_cpu_pct']:.0f} % of its core); "
                        "the figure is a lower bound"
                    )
                if mode == "relay" and m["bottleneck"] in ("upstream+generator core", "generator core (other load)"):
                    out.append(
                        f"{where} relay: limited by the {m['bottleneck']} ({m['others_core_pct']:.0f} % busy), "
                        f"not by the relay (relay at {m['cpu_pct']:.0f} %): a lower bound"
                    )
                for run in cell[mode]["runs"]:
                    runs += 1
                    # Others' load hurts a relay run on either core; a direct run only on the generator's.
                    load = max(run.get("noise_pct", 0) if mode == "relay" else 0, run["others_noise_pct"])
                    if load >= NOISY_PCT:
                        noisy.append(f"{where} {mode} ({load:.0f} %)")
                errors = sum(run["errors"] for run in cell[mode]["runs"])
                if errors:
                    kinds: Counter[str] = Counter()
                    for run in cell[mode]["runs"]:
                        kinds.update(run["error_kinds"])
                    out.append(f"{where} {mode}: {errors} errors ({dict(kinds)})")
    if noisy:
        out.append(
            f"other processes used >= {NOISY_PCT:.0f} % of a core we measure on in {len(noisy)} of {runs} runs "
            f"(medians soften this; rerun on an idle machine for quotable figures): {', '.join(noisy[:8])}"
            + (", ..." if len(noisy) > 8 else "")
        )
    for name, check in outcome["identity"].items():
        if not check["identical"]:
            out.append(f"{name}: the body through the relay differs from the direct one ({check})")
    for cell in outcome["fidelity"]:
        where = f"stream fidelity {cell['endpoint']} {cell['streams']} stream(s)"
        if not cell["identical"]:
            out.append(f"{where}: bytes through the relay are not identical to direct")
        if not cell["all_ok"]:
            out.append(f"{where}: some streams failed")
    waited: list[str] = []
    for cell in outcome.get("event_loop_lag", []):
        where = f"event-loop stall, {cell['transfer']}"
        for number, run in enumerate(cell["runs"], 1):
            if run["status"] != 200 or run["error"]:
                out.append(f"{where} #{number}: the transfer failed (status {run['status']}, {run['error']})")
            if not run["probes_idle"] or not run["probes_busy"] or run["probe_errors"]:
                out.append(
                    f"{where} #{number}: the probe got {run['probes_idle']} idle and {run['probes_busy']} busy "
                    f"answers, {run['probe_errors']} errors"
                )
            if run["relay_cpu_wait_ms"] >= NOISY_WAIT_MS:
                waited.append(f"{cell['transfer']} #{number} ({run['relay_cpu_wait_ms']:.0f} ms)")
    if waited:
        out.append(
            f"other load kept the relay off its core for >= {NOISY_WAIT_MS:.0f} ms in {len(waited)} event-loop stall "
            f"measurement(s), so their stalls may be partly that (rerun on an idle machine): {', '.join(waited)}"
        )
    many = outcome.get("many_streams")
    if many and (many["completed"] < many["streams"] or many["peak_open"] < many["streams"]):
        out.append(
            f"many streams: {many['completed']:,}/{many['streams']:,} completed, "
            f"peak open {many['peak_open']:,} ({many['errors']})"
        )
    if many and many["fd_limit"] < many["relay_fds_needed"]:
        out.append(
            f"many streams: the relay needs about {many['relay_fds_needed']:,} file descriptors for "
            f"{many['streams']:,} streams (client + upstream socket each) but the open-file limit is "
            f"{many['fd_limit']:,} and could not be raised (ulimit -n, or run as root): failures are the limit's"
        )
    row = outcome.get("cluster") or {}
    if "skipped" not in row and row and (row["cluster_cap"]["errors"] or row["process_cap"]["errors"]):
        out.append(f"cluster row: errors {row['cluster_cap']['errors']:.0f} (cluster cap) / {row['process_cap']['errors']:.0f} (process cap)")
    if outcome["relay_log_warnings"]:
        logged = outcome["relay_log_warnings"]
        out.append(f"the relay logged {len(logged)} warning(s); first: {logged[0]}")
    return out
