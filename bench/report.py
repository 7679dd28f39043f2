"""Show and keep the results: terminal tables (ratios first), `bench/results/<timestamp>.json` with every
figure and the machine, and a PNG beside it (throughput and latency percentiles vs concurrency)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import cluster


def _num(value: float | None, digits: int = 0, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+,.{digits}f}" if sign else f"{value:,.{digits}f}"


def _table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        # The first column is a name (left-aligned); the rest are figures (right-aligned).
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    rule = "-" * len(line(headers))
    return "\n".join([title, line(headers), rule, *(line(r) for r in rows)])


def _latencies(m: dict[str, Any]) -> str:
    return f"{_num(m['p50_ms'], 2)}/{_num(m['p90_ms'], 2)}/{_num(m['p99_ms'], 2)}"


def _cells(outcome: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    named = [(cell["endpoint"], cell) for cell in outcome["nonstream"]]
    return named + [(f"{cell['endpoint']} stream", cell) for cell in outcome["stream"]]


def tables(outcome: dict[str, Any]) -> str:
    s, m = outcome["settings"], outcome["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v and k != "relay")
    cores = s["cores"]
    placement = (
        f"relay pinned to core {cores['relay']}; upstream + generator ({s['generator_version'] or s['generator']}) "
        f"on core {cores['upstream_and_generator']}"
        if cores["pinned"]
        else "NOT pinned (fewer than 2 cores)"
    )
    parts = [
        f"relay benchmark, {outcome.get('started_at', '')}: {m['cpu_model']}, {m['cores']} cores, "
        f"{m['memory_gib']} GiB, Python {m['python']}, {versions}",
        f"{placement}; medians of {s['repeats']} repeat(s) x {s['duration_s']:g} s, relay and direct interleaved; "
        f"{s['request_bytes']} B requests, ~1 KB answers, streams of {s['stream_events']} events",
        f"load average {m['load_average_at_start'][0]:.2f} at start, "
        f"{m.get('load_average_at_end', [math.nan])[0]:.2f} at end",
        "",
    ]
    rows = []
    for name, cell in _cells(outcome):
        r, d = cell["relay"]["median"], cell["direct"]["median"]
        rows.append([
            name, str(cell["concurrency"]), _num(cell["ratio"]["rps"], 2), _num(cell["added_ms"]["p50"], 2, True),
            _num(cell["added_ms"]["p99"], 2, True), _num(r["rps"]), _num(d["rps"]), _latencies(r), _latencies(d),
            f"{_num(r['errors'])}/{_num(d['errors'])}",
        ])  # fmt: skip
    parts.append(_table(
        "Throughput and latency, relay vs direct (ms)",
        ["endpoint", "c", "relay/direct", "+p50", "+p99", "relay req/s", "direct req/s",
         "relay p50/p90/p99", "direct p50/p90/p99", "errors r/d"],
        rows,
    ))  # fmt: skip
    rows = []
    for name, cell in _cells(outcome):
        r, d = cell["relay"]["median"], cell["direct"]["median"]
        rows.append([
            name, str(cell["concurrency"]), _num(r["cpu_us_per_req"]), _num(r["cpu_pct"]), _num(r["rss_mib"], 1),
            f"{_num(r['upstream_cpu_pct'])}/{_num(d['upstream_cpu_pct'])}", _num(d["upstream_cpu_us_per_req"]),
            f"{_num(r['gen_cpu_pct'])}/{_num(d['gen_cpu_pct'])}",
            f"{_num(r.get('noise_pct'))}/{_num(r['others_noise_pct'])}/{_num(d['others_noise_pct'])}",
            r["bottleneck"], d["bottleneck"],
        ])  # fmt: skip
    parts += ["", _table(
        "Cost and bottleneck (CPU % of one core; r/d = during the relay run / the direct run; others' load = CPU "
        "used by processes not ours, on the relay core / the generator core in the relay run, the generator core "
        "in the direct run)",
        ["endpoint", "c", "relay CPU us/req", "relay CPU %", "relay RSS MiB", "upstream CPU % r/d",
         "upstream us/req", "generator CPU % r/d", "others' load % rc/gc/d", "limited by (relay)",
         "limited by (direct)"],
        rows,
    )]  # fmt: skip
    parts += ["", _fidelity(outcome), "", _lag(outcome), "", _peer(outcome), "", _identity(outcome), _many(outcome),
              _floor(outcome), _upstream(outcome), _fleet(outcome), cluster.line(outcome.get("cluster"))]  # fmt: skip
    parts.append(
        "\nDirect runs are limited by the core the upstream and generator share: nothing else is in their path."
    )
    if outcome["warnings"]:
        parts += ["", "WARNINGS:", *(f"  - {w}" for w in outcome["warnings"])]
    return "\n".join(parts)


def _fidelity(outcome: dict[str, Any]) -> str:
    f = outcome["settings"]["fidelity"]
    rows = []
    for cell in outcome["fidelity"]:
        r, d = cell["relay"]["median"], cell["direct"]["median"]
        rows.append([
            cell["endpoint"], str(cell["streams"]), _num(cell["ttfb_added_ms"], 2, True),
            _num(cell["gap_added_p50_ms"], 2, True), _num(cell["gap_added_max_ms"], 2, True),
            f"{_num(r['ttfb_p50_ms'], 1)}/{_num(d['ttfb_p50_ms'], 1)}",
            f"{_num(r['gap_p50_ms'], 1)}/{_num(d['gap_p50_ms'], 1)}",
            f"{_num(r['gap_max_ms'], 1)}/{_num(d['gap_max_ms'], 1)}",
            "yes" if cell["identical"] else "NO", "yes" if cell["all_ok"] else "NO",
        ])  # fmt: skip
    return _table(
        f"Streaming fidelity (think {f['delay_ms']} ms, {f['event_delay_ms']} ms between events, "
        f"{f['events']} deltas; times at the client, ms)",
        ["endpoint", "streams", "TTFB over direct", "added gap p50", "added gap max", "TTFB p50 r/d",
         "gap p50 r/d", "gap max r/d", "bytes identical", "all ok"],
        rows,
    )  # fmt: skip


def _lag(outcome: dict[str, Any]) -> str:
    cells = outcome.get("event_loop_lag")
    if not cells:
        return "Event-loop stalls: not measured"
    lag = outcome["settings"]["lag"]
    rows = []
    for cell in cells:
        m = cell["median"]
        rows.append([
            cell["transfer"], str(len(cell["runs"])), _num(cell["stall_median_ms"], 1), _num(cell["stall_max_ms"], 1),
            {True: "yes", False: "NO", None: "-"}[cell["within_target"]], _num(m["transfer_ms"]),
            f"{_num(m['idle_p50_ms'], 2)}/{_num(m['idle_max_ms'], 1)}", _num(m["probes_busy"]),
            _num(max(run["relay_cpu_wait_ms"] for run in cell["runs"]), 1),
        ])  # fmt: skip
    return _table(
        f"Event-loop stalls in the relay (a second client sends GET /health back to back on its own keep-alive "
        f"connection; stall = its longest round trip during the transfer and {lag['margin_s']:g} s after, less its "
        f"median round trip in the {lag['idle_s']:g} s before; target <= {lag['target_ms']:g} ms; relay CPU wait = "
        "time other load kept the relay's loop off its core meanwhile; ms)",
        ["transfer", "repeats", "stall median", "stall max", "within target", "transfer time",
         "idle RTT p50/max", "probes during", "relay CPU wait max"],
        rows,
    )  # fmt: skip


def _peer(outcome: dict[str, Any]) -> str:
    peer = outcome["nginx"]
    if "skipped" in peer:
        return f"Peer nginx: skipped ({peer['skipped']})"
    rows = []
    for cell in peer["cells"]:
        m = cell["median"]
        identical = peer.get(f"{cell['endpoint']} {'stream' if cell['kind'] == 'stream' else 'non-stream'} identical")
        rows.append([
            f"{cell['endpoint']}{' stream' if cell['kind'] == 'stream' else ''}", str(cell["concurrency"]),
            _num(cell.get("nginx_over_direct"), 2), _num(cell.get("relay_over_nginx"), 2), _num(m["rps"]),
            _num(cell.get("relay_rps")), _num(cell.get("direct_rps")), _latencies(m), _num(m["cpu_us_per_req"]),
            _num(cell.get("relay_cpu_us_per_req")), _num(m["errors"]), {True: "yes", False: "NO", None: "-"}[identical],
            m["bottleneck"],
        ])  # fmt: skip
    return _table(
        f"Peer: {peer.get('version', 'nginx')}, one process pinned like the relay, unbuffered, keep-alive upstream",
        ["endpoint", "c", "nginx/direct", "relay/nginx", "nginx req/s", "relay req/s", "direct req/s",
         "nginx p50/p90/p99", "nginx CPU us/req", "relay CPU us/req", "errors", "bytes identical", "limited by"],
        rows,
    )  # fmt: skip


def _fleet(outcome: dict[str, Any]) -> str:
    fleet = outcome.get("fleet")
    if not fleet:
        return ""
    cpu, drill, affinity = fleet["cpu_us_per_req"], fleet.get("drill", {}), fleet.get("affinity", {})
    lines = [
        f"Fleet (chat c=64, relay CPU per request): 1 upstream {_num(cpu['one'])} us, 3 upstreams {_num(cpu['three'])} us "
        f"= {_num(fleet['routing_cost_ratio'], 3)}x (target <= 1.05x)",
    ]
    if drill:
        lines.append(
            f"Failover drill: c={drill['concurrency']} for {drill['seconds']:g} s, one of 3 upstreams killed halfway: "
            f"{drill['client_errors']} client errors of {drill['requests']:,} requests {drill['error_kinds'] or ''}; "
            f"ejected {_num(drill['ejected_after_ms'])} ms after the kill"
        )
    if affinity:
        lines.append(
            "Affinity hit rate (300 conversations of 5 turns; a hit: a turn on its first turn's upstream): "
            f"{affinity['with_affinity']:.1%} with X-Session-ID, "
            f"{affinity['without_affinity']:.1%} without a key"
        )
    return "\n".join(lines)


def _identity(outcome: dict[str, Any]) -> str:
    checks = outcome["identity"]
    verdicts = ", ".join(f"{name} {'yes' if c['identical'] else 'NO'}" for name, c in checks.items())
    return f"Bytes identical to direct (sha256 of the body): {verdicts}"


def _many(outcome: dict[str, Any]) -> str:
    many = outcome.get("many_streams")
    if not many:
        return ""
    errors = f", errors {many['errors']}" if many["errors"] else ""
    return (
        f"Many open streams: {many['streams']:,} slow chat streams ({many['events_per_stream']} events over "
        f"{many['stream_seconds']:.1f} s) through the relay: {many['completed']:,} complete, peak open "
        f"{many['peak_open']:,}{errors}; relay RSS idle {many['relay_idle_rss_mib']:.1f} MiB -> peak "
        f"{many['relay_peak_rss_mib']:.1f} MiB (after: {many['relay_rss_after_mib']:.1f} MiB; at start: "
        f"{outcome['relay_idle_rss_mib_at_start']:.1f} MiB); relay CPU {many['relay_cpu_seconds']:.2f} s"
    )


def _floor(outcome: dict[str, Any]) -> str:
    floor = outcome["floor"]
    if not floor:
        return ""
    relay = ", ".join(
        f"{endpoint} {_num(us)} us = {_num(floor['relay_over_floor'][endpoint], 2)}x floor"
        for endpoint, us in floor["relay_cpu_us_per_req_c64"].items()
    )
    return (
        f"Floor (c={outcome['settings']['floor_concurrency']}, CPU per request on the relay's core): raw ASGI app "
        f"under uvicorn {_num(floor['app_cpu_us_per_req'])} us + aiohttp client loop "
        f"{_num(floor['client_cpu_us_per_req'])} us = {_num(floor['floor_cpu_us_per_req'])} us; "
        f"relay {relay or '(c=64 not measured)'}"
    )


def _upstream(outcome: dict[str, Any]) -> str:
    cells = outcome["nonstream"] + outcome["stream"]
    if not cells:
        return ""
    best = max(cells, key=lambda c: c["direct"]["median"]["rps"])
    d = best["direct"]["median"]
    busiest = max(c["relay"]["median"]["upstream_cpu_pct"] for c in cells)
    return (
        f"Upstream (fake): up to {_num(d['rps'])} req/s direct ({best['endpoint']} c={best['concurrency']}, "
        f"{_num(d['upstream_cpu_us_per_req'])} us CPU/request); during relay runs it used at most {busiest:.0f} % "
        "of a core"
    )


def _clean(value: Any) -> Any:
    """JSON has no NaN: an unmeasured figure is null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def save(outcome: dict[str, Any], out_dir: Path, stamp: str) -> tuple[Path, Path | None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(_clean(outcome), indent=1) + "\n")
    png_path = out_dir / f"{stamp}.png"
    try:
        plot(outcome, png_path)
    except ImportError:
        return json_path, None
    return json_path, png_path


def plot(outcome: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    endpoints = sorted({cell["endpoint"] for cell in outcome["nonstream"]})
    fig, axes = plt.subplots(len(endpoints), 2, figsize=(12, 4.2 * len(endpoints)), squeeze=False)
    colours = {"relay": "tab:red", "direct": "tab:blue"}
    for row, endpoint in enumerate(endpoints):
        cells = sorted((c for c in outcome["nonstream"] if c["endpoint"] == endpoint), key=lambda c: c["concurrency"])
        xs = [c["concurrency"] for c in cells]
        rps_ax, lat_ax = axes[row]
        for mode in ("relay", "direct"):
            rps_ax.plot(xs, [c[mode]["median"]["rps"] for c in cells], "o-", color=colours[mode], label=mode)
            for pct, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
                lat_ax.plot(xs, [c[mode]["median"][f"{pct}_ms"] for c in cells], style, marker="o",
                            color=colours[mode], label=f"{mode} {pct}")  # fmt: skip
        for cell in cells:
            rps_ax.annotate(f"{cell['ratio']['rps']:.2f}x", (cell["concurrency"], cell["relay"]["median"]["rps"]),
                            textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)  # fmt: skip
        for ax in (rps_ax, lat_ax):
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel("concurrency (closed loop)")
            ax.grid(True, which="both", alpha=0.3)
        rps_ax.set_ylabel("req/s")
        rps_ax.set_ylim(bottom=0)
        rps_ax.set_title(f"{endpoint}, non-stream: throughput (label: relay/direct)")
        lat_ax.set_yscale("log")
        lat_ax.set_ylabel("latency (ms)")
        lat_ax.set_title(f"{endpoint}, non-stream: latency percentiles")
        rps_ax.legend()
        lat_ax.legend(fontsize=7, ncol=2)
    m, s = outcome["machine"], outcome["settings"]
    fig.suptitle(
        f"relay vs direct, {m['cpu_model']} ({m['cores']} cores), relay pinned to core {s['cores']['relay']}, "
        f"{s['generator']}, medians of {s['repeats']} x {s['duration_s']:g} s",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
