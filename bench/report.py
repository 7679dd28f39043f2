"""Show and keep the results: terminal tables (ratios first, at most 120 columns), `bench/results/<timestamp>.json`
with every figure and the machine, and a PNG beside it: the headline figures, each against its target."""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import cluster

WIDTH = 120  # every line the tables print fits in this many columns
_GAP = "  "
_VERDICT = {True: "yes", False: "NO", None: "-"}


def _num(value: float | None, digits: int = 0, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+,.{digits}f}" if sign else f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    """A latency to about three significant figures: 0.28, 12.3, 169."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return _num(value, 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0)


def _wrap(text: str, first: str = "", indent: str = "  ") -> str:
    """A paragraph in lines of at most WIDTH columns, the lines after the first indented (a hanging indent)."""
    if not text:
        return ""
    return "\n".join(textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=indent, break_on_hyphens=False))


def _table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], keys: int = 1) -> str:
    """A titled table. A header may take two lines ("relay\\nreq/s"); the first column is a name (left-aligned),
    the rest are figures (right-aligned). Should the figures make it wider than WIDTH, the columns that do not
    fit go on below in a table of their own that repeats the first `keys` columns."""
    heads = [h.split("\n") for h in headers]
    depth = max(len(head) for head in heads)
    heads = [[""] * (depth - len(head)) + head for head in heads]  # aligned on the line above the rule
    widths = [max(len(text) for text in [*head, *(row[i] for row in rows)]) for i, head in enumerate(heads)]

    def span(columns: list[int]) -> int:
        return sum(widths[i] for i in columns) + len(_GAP) * (len(columns) - 1)

    chunks = [list(range(keys))]
    for i in range(keys, len(headers)):
        if len(chunks[-1]) > keys and span([*chunks[-1], i]) > WIDTH:
            chunks.append(list(range(keys)))
        chunks[-1].append(i)
    out = [_wrap(title)]
    for n, columns in enumerate(chunks):

        def line(cells: Sequence[str], columns: list[int] = columns) -> str:
            return _GAP.join(cells[i].ljust(widths[i]) if i == 0 else cells[i].rjust(widths[i]) for i in columns)

        if n:
            out.append("(continued)")
        out += [line([head[k] for head in heads]).rstrip() for k in range(depth)]
        out.append("-" * span(columns))
        out += [line(row).rstrip() for row in rows]
    return "\n".join(out)


def _latencies(m: dict[str, Any]) -> str:
    return "/".join(_ms(m[f"{p}_ms"]) for p in ("p50", "p90", "p99"))


def _cells(outcome: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    named = [(cell["endpoint"], cell) for cell in outcome["nonstream"]]
    return named + [(f"{cell['endpoint']} stream", cell) for cell in outcome["stream"]]


def _header(outcome: dict[str, Any]) -> list[str]:
    s, m = outcome["settings"], outcome["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v and k != "relay")
    cores = s["cores"]
    placement = (
        f"relay pinned to core {cores['relay']}; upstream + generator ({s['generator_version'] or s['generator']}) "
        f"on core {cores['upstream_and_generator']}"
        if cores["pinned"]
        else "NOT pinned (fewer than 2 cores)"
    )
    lines = [
        f"relay benchmark, {outcome.get('started_at', '')}: {m['cpu_model']}, {m['cores']} cores, "
        f"{m['memory_gib']} GiB, Python {m['python']}",
        f"versions: {versions}",
        placement,
        f"medians of {s['repeats']} repeat(s) x {s['duration_s']:g} s, relay and direct interleaved; "
        f"{s['request_bytes']} B requests, ~1 KB answers, streams of {s['stream_events']} events",
        f"load average {m['load_average_at_start'][0]:.2f} at start, "
        f"{m.get('load_average_at_end', [math.nan])[0]:.2f} at end",
    ]
    if m.get("unlike_published"):
        lines.append(m["unlike_published"])
    return [_wrap(line) for line in lines]


def _throughput(outcome: dict[str, Any]) -> str:
    rows = []
    for name, cell in _cells(outcome):
        r, d = cell["relay"]["median"], cell["direct"]["median"]
        rows.append([
            name, str(cell["concurrency"]), _num(cell["ratio"]["rps"], 2), _num(cell["added_ms"]["p50"], 2, True),
            _num(cell["added_ms"]["p99"], 2, True), _num(r["rps"]), _num(d["rps"]), _latencies(r), _latencies(d),
            f"{_num(r['errors'])}/{_num(d['errors'])}",
        ])  # fmt: skip
    return _table(
        "Throughput and latency, relay vs direct (c = concurrent clients, closed loop; latencies in ms; "
        "+p50/+p99 = what the relay adds over direct)",
        ["endpoint", "c", "relay/\ndirect", "+p50\nms", "+p99\nms", "relay\nreq/s", "direct\nreq/s",
         "relay ms\np50/p90/p99", "direct ms\np50/p90/p99", "errors\nr/d"],
        rows, keys=2,
    )  # fmt: skip


def _relay_cost(outcome: dict[str, Any]) -> str:
    rows = []
    for name, cell in _cells(outcome):
        r = cell["relay"]["median"]
        rows.append([
            name, str(cell["concurrency"]), _num(r["cpu_us_per_req"]), _num(r["cpu_pct"]), _num(r["rss_mib"], 1),
            _num(r.get("noise_pct")), r["bottleneck"],
        ])  # fmt: skip
    return _table(
        "Cost on the relay's core, relay runs (CPU % of one core; others' load = CPU used on the relay's core by "
        "processes not ours)",
        ["endpoint", "c", "relay CPU\nus/req", "relay\nCPU %", "relay\nRSS MiB", "others'\nload %",
         "limited by\n(relay run)"],
        rows, keys=2,
    )  # fmt: skip


def _other_core(outcome: dict[str, Any]) -> str:
    rows = []
    for name, cell in _cells(outcome):
        r, d = cell["relay"]["median"], cell["direct"]["median"]
        rows.append([
            name, str(cell["concurrency"]), f"{_num(r['upstream_cpu_pct'])}/{_num(d['upstream_cpu_pct'])}",
            _num(d["upstream_cpu_us_per_req"]), f"{_num(r['gen_cpu_pct'])}/{_num(d['gen_cpu_pct'])}",
            f"{_num(r['others_noise_pct'])}/{_num(d['others_noise_pct'])}", d["bottleneck"],
        ])  # fmt: skip
    return _table(
        "The upstream + generator core (CPU % of one core; r/d = during the relay run / the direct run; upstream "
        "us/req in the direct run; others' load = CPU used on this core by processes not ours)",
        ["endpoint", "c", "upstream\nCPU % r/d", "upstream\nus/req", "generator\nCPU % r/d", "others'\nload % r/d",
         "limited by\n(direct run)"],
        rows, keys=2,
    )  # fmt: skip


def tables(outcome: dict[str, Any]) -> str:
    parts = [*_header(outcome), "", _throughput(outcome), "", _relay_cost(outcome), "", _other_core(outcome)]
    parts += ["", _fidelity(outcome), "", _lag(outcome), "", _peer(outcome), ""]
    summaries = [_identity(outcome), _many(outcome), _floor(outcome), _upstream(outcome), _fleet(outcome),
                 _wrap(cluster.line(outcome.get("cluster")))]  # fmt: skip
    parts += [s for s in summaries if s]
    parts.append(
        "\nDirect runs are limited by the core the upstream and generator share: nothing else is in their path."
    )
    if outcome["warnings"]:
        parts += ["", "WARNINGS:", *(_wrap(w, first="  - ", indent="    ") for w in outcome["warnings"])]
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
        f"{f['events']} deltas; times at the client, ms; r/d = relay/direct)",
        ["endpoint", "streams", "TTFB over\ndirect", "added gap\np50", "added gap\nmax", "TTFB p50\nr/d",
         "gap p50\nr/d", "gap max\nr/d", "bytes\nidentical", "all ok"],
        rows, keys=2,
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
            _VERDICT[cell["within_target"]], _num(m["transfer_ms"]),
            f"{_num(m['idle_p50_ms'], 2)}/{_num(m['idle_max_ms'], 1)}", _num(m["probes_busy"]),
            _num(max(run["relay_cpu_wait_ms"] for run in cell["runs"]), 1),
        ])  # fmt: skip
    return _table(
        f"Event-loop stalls in the relay (a second client sends GET /health back to back on its own keep-alive "
        f"connection; stall = its longest round trip during the transfer and {lag['margin_s']:g} s after, less its "
        f"median round trip in the {lag['idle_s']:g} s before; target <= {lag['target_ms']:g} ms; relay CPU wait = "
        "time other load kept the relay's loop off its core meanwhile; ms)",
        ["transfer", "repeats", "stall\nmedian", "stall\nmax", "within\ntarget", "transfer\ntime",
         "idle RTT\np50/max", "probes\nduring", "relay CPU\nwait max"],
        rows,
    )  # fmt: skip


def _peer(outcome: dict[str, Any]) -> str:
    peer = outcome["nginx"]
    if "skipped" in peer:
        return f"Peer nginx: skipped ({peer['skipped']})"
    speed, cost = [], []
    for cell in peer["cells"]:
        m = cell["median"]
        identical = peer.get(f"{cell['endpoint']} {'stream' if cell['kind'] == 'stream' else 'non-stream'} identical")
        name, c = f"{cell['endpoint']}{' stream' if cell['kind'] == 'stream' else ''}", str(cell["concurrency"])
        speed.append([
            name, c, _num(cell.get("nginx_over_direct"), 2), _num(cell.get("relay_over_nginx"), 2), _num(m["rps"]),
            _num(cell.get("relay_rps")), _num(cell.get("direct_rps")), _latencies(m), _num(m["errors"]),
            _VERDICT[identical],
        ])  # fmt: skip
        cost.append([name, c, _num(m["cpu_us_per_req"]), _num(cell.get("relay_cpu_us_per_req")), m["bottleneck"]])
    return "\n\n".join([
        _table(
            f"Peer: {peer.get('version', 'nginx')}, one process pinned like the relay, unbuffered, keep-alive upstream",
            ["endpoint", "c", "nginx/\ndirect", "relay/\nnginx", "nginx\nreq/s", "relay\nreq/s", "direct\nreq/s",
             "nginx ms\np50/p90/p99", "nginx\nerrors", "bytes\nidentical"],
            speed, keys=2,
        ),
        _table(
            "Peer: CPU per request on the pinned core, nginx beside the relay in the same cell",
            ["endpoint", "c", "nginx CPU\nus/req", "relay CPU\nus/req", "limited by\n(nginx run)"],
            cost, keys=2,
        ),
    ])  # fmt: skip


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
            f"{drill['client_errors']} client errors of {drill['requests']:,} requests"
            f"{' ' + str(drill['error_kinds']) if drill['error_kinds'] else ''}; "
            f"ejected {_num(drill['ejected_after_ms'])} ms after the kill"
        )
    if affinity:
        lines.append(
            "Affinity hit rate (300 conversations of 5 turns; a hit: a turn on its first turn's upstream): "
            f"{affinity['with_affinity']:.1%} with X-Session-ID, "
            f"{affinity['without_affinity']:.1%} without a key"
        )
    return "\n".join(_wrap(line) for line in lines)


def _identity(outcome: dict[str, Any]) -> str:
    checks = outcome["identity"]
    verdicts = ", ".join(f"{name} {'yes' if c['identical'] else 'NO'}" for name, c in checks.items())
    return _wrap(f"Bytes identical to direct (sha256 of the body): {verdicts}")


def _many(outcome: dict[str, Any]) -> str:
    many = outcome.get("many_streams")
    if not many:
        return ""
    errors = f", errors {many['errors']}" if many["errors"] else ""
    return _wrap(
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
    return _wrap(
        f"Floor (c={outcome['settings']['floor_concurrency']}, CPU per request on the relay's core): raw ASGI app "
        f"under uvicorn {_num(floor['app_cpu_us_per_req'])} us + aiohttp client loop "
        f"{_num(floor['client_cpu_us_per_req'])} us = {_num(floor['floor_cpu_us_per_req'])} us; "
        f"relay {relay or '(c=64 not measured)'} (target <= {CPU_TARGET:g}x)"
    )


def _upstream(outcome: dict[str, Any]) -> str:
    cells = outcome["nonstream"] + outcome["stream"]
    if not cells:
        return ""
    best = max(cells, key=lambda c: c["direct"]["median"]["rps"])
    d = best["direct"]["median"]
    busiest = max(c["relay"]["median"]["upstream_cpu_pct"] for c in cells)
    return _wrap(
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


# The targets the plot draws (README, Performance).
CPU_TARGET = 1.15  # relay CPU per non-stream request at c=64, over the floor
STREAM_CPU_TARGET = 1.3  # relay CPU per stream, over the same endpoint's non-stream request
ADDED_MS_TARGET = {"p50": 0.4, "p99": 1.0}  # added latency at c=1
TTFB_TARGET_MS = 3.0
GAP_TARGET_MS = 1.0
FLEET_TARGET = 1.05  # relay CPU per request with 3 upstreams, over 1
_OVER = "tab:red"  # a figure past its target is labelled in this colour


def _value(x: Any) -> float:
    return math.nan if x is None else float(x)


def _bars(ax: Any, xs: Sequence[float], values: Sequence[float], width: float, colour: str, label: str,
          limits: Sequence[float | None], fmt: str) -> None:
    """Bars with their values written above (below, when negative); a value past its limit in red."""
    heights = [0.0 if math.isnan(v) else v for v in values]
    bars = ax.bar(xs, heights, width, color=colour, label=label, zorder=2)
    texts = ax.bar_label(bars, labels=["-" if math.isnan(v) else fmt.format(v) for v in values], padding=2,
                         fontsize=8, bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5, "alpha": 0.8})  # fmt: skip
    for text, v, limit in zip(texts, values, limits, strict=True):
        text.set_zorder(4)  # over a target line that passes behind it
        if limit is not None and not math.isnan(v) and v > limit:
            text.set_color(_OVER)
            text.set_fontweight("bold")


def _target(ax: Any, y: float, colour: str, label: str, xmin: float | None = None, xmax: float | None = None,
            style: str = "--") -> None:
    if math.isnan(y):
        return
    if xmin is None or xmax is None:
        ax.axhline(y, color=colour, linestyle=style, linewidth=1.4, label=label, zorder=3)
    else:
        ax.hlines(y, xmin, xmax, colors=colour, linestyles=style, linewidth=1.6, label=label, zorder=3)


def _headroom(ax: Any, highest: float, lowest: float = 0.0) -> None:
    """Room above the bars for their labels and the legend."""
    top = 1.55 * (highest if highest > 0 and not math.isnan(highest) else 1.0)
    bottom = 0.0 if math.isnan(lowest) or lowest >= 0 else lowest - 0.1 * (top - lowest)  # room for a label below
    ax.set_ylim(bottom, top)


def _thousands(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))


def _empty(ax: Any, title: str, why: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def _plot_cpu(ax: Any, outcome: dict[str, Any]) -> None:
    c = outcome["settings"].get("floor_concurrency", 64)
    nonstream = {cell["endpoint"]: _value(cell["relay"]["median"]["cpu_us_per_req"])
                 for cell in outcome["nonstream"] if cell["concurrency"] == c}  # fmt: skip
    stream = {cell["endpoint"]: _value(cell["relay"]["median"]["cpu_us_per_req"]) for cell in outcome["stream"]}
    title = f"Relay CPU per request at c={c} (µs, lower is better)"
    if not nonstream and not stream:
        _empty(ax, title, f"no relay run at c={c}")
        return
    floor_us = _value((outcome["floor"] or {}).get("floor_cpu_us_per_req"))
    limit = CPU_TARGET * floor_us
    names = [*nonstream, *(f"{e}\nstream" for e in stream)]
    xs = list(range(len(names)))
    _bars(ax, xs[: len(nonstream)], list(nonstream.values()), 0.6, "tab:blue", "non-stream",
          [None if math.isnan(limit) else limit] * len(nonstream), "{:,.0f}")  # fmt: skip
    stream_limits = [STREAM_CPU_TARGET * nonstream[e] if e in nonstream else None for e in stream]
    _bars(ax, xs[len(nonstream):], list(stream.values()), 0.6, "tab:purple",
          f"stream ({outcome['settings'].get('stream_events', '?')} events)", stream_limits, "{:,.0f}")  # fmt: skip
    _target(ax, floor_us, "0.35", f"floor {_num(floor_us)} µs (raw ASGI app + aiohttp client)", style=":")
    _target(ax, limit, "tab:red", f"target ≤ {CPU_TARGET:g} × floor = {_num(limit)} µs")
    first = True
    for x, limit_us in zip(xs[len(nonstream):], stream_limits, strict=True):
        if limit_us is not None:
            _target(ax, limit_us, "tab:orange", f"stream target ≤ {STREAM_CPU_TARGET:g} × non-stream" if first else
                    "_", x - 0.4, x + 0.4)  # fmt: skip
            first = False
    ax.set_xticks(xs, names)
    _thousands(ax)
    ax.set_ylabel("µs of relay CPU per request")
    ax.set_title(title, fontsize=10)
    highest = max(_finite([*nonstream.values(), *stream.values(), limit, *(v for v in stream_limits if v)]), default=1)
    _headroom(ax, highest)


def _plot_added(ax: Any, outcome: dict[str, Any]) -> None:
    cells = sorted((cell for cell in outcome["nonstream"] if cell["concurrency"] == 1), key=lambda c: c["endpoint"])
    title = "Latency added at c=1, over direct (ms, non-stream)"
    if not cells:
        _empty(ax, title, "no run at c=1")
        return
    xs = list(range(len(cells)))
    colours = {"p50": "tab:blue", "p99": "tab:orange"}
    values: list[float] = []
    for offset, pct in ((-0.2, "p50"), (0.2, "p99")):
        figures = [_value(cell["added_ms"][pct]) for cell in cells]
        values += figures
        _bars(ax, [x + offset for x in xs], figures, 0.38, colours[pct], f"{pct} added",
              [ADDED_MS_TARGET[pct]] * len(cells), "{:+.2f}")  # fmt: skip
    for pct, colour in colours.items():
        _target(ax, ADDED_MS_TARGET[pct], colour, f"{pct} target ≤ {ADDED_MS_TARGET[pct]:g} ms")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(xs, [cell["endpoint"] for cell in cells])
    ax.set_ylabel("ms added by the relay")
    ax.set_title(title, fontsize=10)
    _headroom(ax, max(_finite([*values, *ADDED_MS_TARGET.values()])), min(_finite(values), default=0.0))


def _plot_streaming(ax: Any, outcome: dict[str, Any]) -> None:
    cells = outcome["fidelity"]
    f = outcome["settings"]["fidelity"]
    title = f"Streams: added over direct (ms; {f['delay_ms']} ms think, {f['event_delay_ms']} ms between events)"
    if not cells:
        _empty(ax, title, "not measured")
        return
    xs = list(range(len(cells)))
    series = (("ttfb_added_ms", "time to first byte", "tab:green", TTFB_TARGET_MS),
              ("gap_added_p50_ms", "gap between events, p50", "tab:purple", GAP_TARGET_MS))  # fmt: skip
    values: list[float] = []
    for offset, (key, label, colour, limit) in zip((-0.2, 0.2), series, strict=True):
        figures = [_value(cell[key]) for cell in cells]
        values += figures
        _bars(ax, [x + offset for x in xs], figures, 0.38, colour, label, [limit] * len(cells), "{:+.2f}")
    for _, label, colour, limit in series:
        _target(ax, limit, colour, f"{label.split(',')[0]} target ≤ {limit:g} ms")
    ax.axhline(0, color="black", linewidth=0.8)
    streams = ["1 stream" if cell["streams"] == 1 else f"{cell['streams']} streams" for cell in cells]
    ax.set_xticks(xs, [f"{cell['endpoint']}\n{n}" for cell, n in zip(cells, streams, strict=True)])
    ax.set_ylabel("ms added by the relay")
    ax.set_title(title, fontsize=10)
    _headroom(ax, max(_finite([*values, TTFB_TARGET_MS, GAP_TARGET_MS])), min(_finite(values), default=0.0))


def _plot_throughput(ax: Any, outcome: dict[str, Any]) -> None:
    endpoints = sorted({cell["endpoint"] for cell in outcome["nonstream"]})
    title = "Throughput, non-stream (relay: one worker on one core)"
    if not endpoints:
        _empty(ax, title, "not measured")
        return
    styles = ["-", "--", "-.", ":"]
    xs: list[int] = []
    for n, endpoint in enumerate(endpoints):
        cells = sorted((c for c in outcome["nonstream"] if c["endpoint"] == endpoint), key=lambda c: c["concurrency"])
        xs = sorted({*xs, *(c["concurrency"] for c in cells)})
        for mode, colour in (("relay", "tab:red"), ("direct", "tab:blue")):
            ax.plot([c["concurrency"] for c in cells], [_value(c[mode]["median"]["rps"]) for c in cells],
                    styles[n % len(styles)], marker="o", color=colour, label=f"{mode}, {endpoint}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("concurrent clients (closed loop)")
    ax.set_ylabel("req/s")
    _thousands(ax)
    ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.25)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="upper left")
    ax.set_title(title, fontsize=10)


def _plot_fleet_cluster(ax: Any, outcome: dict[str, Any]) -> None:
    fleet = outcome.get("fleet") or {}
    row = outcome.get("cluster") or {}
    title = "Relay CPU per request, chat c=64: routing over 3 upstreams, cluster-wide cap (µs)"
    names: list[str] = []
    positions: list[int] = []
    values: list[float] = []
    notes: list[str] = []
    if fleet:
        one, three = _value(fleet["cpu_us_per_req"]["one"]), _value(fleet["cpu_us_per_req"]["three"])
        names += ["1 upstream", "3 upstreams"]
        positions += [0, 1]
        values += [one, three, FLEET_TARGET * one]
        _bars(ax, [0, 1], [one, three], 0.6, "tab:blue", "fleet: the relay with 1 / 3 upstreams",
              [None, FLEET_TARGET * one], "{:,.0f}")  # fmt: skip
        _target(ax, FLEET_TARGET * one, "tab:red", f"3 upstreams: target ≤ {FLEET_TARGET:g} × 1 upstream", 0.6, 1.4)
    else:
        notes.append("fleet: not measured")
    if row and "skipped" not in row:
        at = positions[-1] + 2 if positions else 0  # a gap between the two groups
        process, cap = _value(row["process_cap"]["cpu_us_per_req"]), _value(row["cluster_cap"]["cpu_us_per_req"])
        names += ["per-process\ncap", "cluster cap\n(Redis)"]
        positions += [at, at + 1]
        values += [process, cap]
        _bars(ax, [at, at + 1], [process, cap], 0.6, "tab:cyan",
              f"cap {row.get('cap', '')}, {_num(_value(row.get('cpu_us_added')), 0, True)} µs with Redis (no target)",
              [None, None], "{:,.0f}")  # fmt: skip
    else:
        notes.append(f"cluster cap: {row.get('skipped', 'not measured')}")
    if not names:
        _empty(ax, title, "\n".join(notes))
        return
    ax.set_xticks(positions, names)
    ax.set_xlim(-0.8, max(positions) + 0.8)
    _thousands(ax)
    ax.set_ylabel("µs of relay CPU per request")
    ax.set_title(title, fontsize=10)
    if notes:
        ax.text(0.99, 0.97, "; ".join(notes), ha="right", va="top", transform=ax.transAxes, fontsize=8, color="0.4")
    _headroom(ax, max(_finite(values), default=1.0))


def plot(outcome: dict[str, Any], path: Path) -> None:
    """The headline figures, each against its target (dashed lines); throughput and the fleet/cluster rows below."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(17, 10.5))
    grid = fig.add_gridspec(2, 6, height_ratios=[1.15, 1])
    panels = [
        (fig.add_subplot(grid[0, 0:2]), _plot_cpu),
        (fig.add_subplot(grid[0, 2:4]), _plot_added),
        (fig.add_subplot(grid[0, 4:6]), _plot_streaming),
        (fig.add_subplot(grid[1, 0:3]), _plot_throughput),
        (fig.add_subplot(grid[1, 3:6]), _plot_fleet_cluster),
    ]
    for ax, draw in panels:
        draw(ax, outcome)
        if draw is not _plot_throughput and ax.get_legend_handles_labels()[0]:
            ax.grid(True, axis="y", alpha=0.3, zorder=0)
            ax.legend(fontsize=8, loc="upper left", ncol=2 if draw is not _plot_cpu else 1, framealpha=0.9)
    m, s = outcome["machine"], outcome["settings"]
    fig.suptitle(
        f"relay benchmark {outcome.get('started_at', '')}: {m['cpu_model']} ({m['cores']} cores), relay pinned to "
        f"core {s['cores']['relay']}, {s['generator']}, medians of {s['repeats']} x {s['duration_s']:g} s"
        f"{' (--quick)' if s.get('quick') else ''}\nbars: measured; dashed lines: targets (a figure past its "
        "target is labelled in red)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
