"""bench/report.py on a synthetic outcome made by bench/results.py `assemble`: the terminal tables fit in 120
columns (long figures, long labels and long warnings included) and keep the figures a reader quotes; the plot
writes a PNG. No processes, no sockets, no files outside tmp_path."""

from __future__ import annotations

from typing import Any

import pytest

from bench import report, results

ENDPOINTS = ("chat", "responses")


def _run(mode: str, scale: float = 1.0, **overrides: Any) -> dict[str, Any]:
    """One measurement's figures, shaped like bench/measure.py `measure` returns them."""
    relay = mode != "direct"
    figures: dict[str, Any] = {
        "rps": (8_000.0 if relay else 37_000.0) * scale,
        "ok": 8_000,
        "errors": 0,
        "error_kinds": {},
        "p50_ms": (6.5 if relay else 1.6) / scale,
        "p90_ms": (12.3 if relay else 2.2) / scale,
        "p99_ms": (14.1 if relay else 3.0) / scale,
        "max_ms": 20.0 / scale,
        "seconds": 1.0,
        "wall_seconds": 1.01,
        "gen_cpu_seconds": 0.2,
        "gen_cpu_pct": 17.0 if relay else 45.0,
        "upstream_cpu_pct": 22.0 if relay else 57.0,
        "upstream_cpu_us_per_req": 15.0,
        "others_core_pct": 40.0 if relay else 99.5,
        "others_noise_pct": 0.0,
        "noise_pct": 0.0,
        "bottleneck": "relay CPU" if relay else "upstream+generator core",
    }
    if relay:
        figures.update(cpu_us_per_req=124.0, cpu_pct=99.0, rss_mib=60.5)
    figures.update(overrides)
    return figures


def _fidelity_run(ttfb_ms: float, gap_ms: float, streams: int) -> dict[str, Any]:
    return {
        "streams": streams, "ok": streams, "ttfb_p50_ms": ttfb_ms, "ttfb_max_ms": ttfb_ms + 1, "gap_p50_ms": gap_ms,
        "gap_max_ms": gap_ms + 1, "events": [11], "digests": ["d" * 64], "problems": {},
    }  # fmt: skip


def _lag_run(stall_ms: float, wait_ms: float) -> dict[str, Any]:
    return {
        "stall_ms": stall_ms, "busy_max_ms": stall_ms, "idle_p50_ms": 0.08, "idle_max_ms": 2.5, "probes_idle": 2733,
        "probes_busy": 6828, "probe_errors": 0, "status": 200, "error": None, "bytes_sent": 16 << 20,
        "bytes_received": 1027, "transfer_ms": 666.9, "relay_cpu_wait_ms": wait_ms,
    }  # fmt: skip


def _outcome(*, extreme: bool = False) -> dict[str, Any]:
    """What `assemble` makes of a full run: every row, fleet, cluster and nginx included. `extreme`: figures and
    labels as wide as they get (10x latencies, six-figure req/s, long bottleneck names, errors, noisy runs)."""
    runs: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    wide: dict[str, Any] = {}
    if extreme:
        wide = {"p50_ms": 1234.56, "p90_ms": 23456.7, "p99_ms": 123456.78, "rps": 123456.7, "errors": 12345,
                "error_kinds": {"ServerDisconnectedError": 12345}, "bottleneck": "generator core (other load)",
                "others_noise_pct": 55.0, "noise_pct": 44.0, "cpu_us_per_req": 123456.0, "rss_mib": 12345.6}  # fmt: skip
    for endpoint in ENDPOINTS:
        for c in (1, 16, 64, 256):
            for mode in ("relay", "direct"):
                # c=1: the relay adds a fraction of a ms; the direct run is latency-bound.
                scale = 0.4 if c == 1 else 1.0
                extra = {"p50_ms": 0.28, "p99_ms": 0.51} if c == 1 and mode == "relay" else {}
                extra |= {"p50_ms": 0.03, "p99_ms": 0.06} if c == 1 and mode == "direct" else {}
                runs[("nonstream", endpoint, c, mode)] = [_run(mode, scale, **extra | wide) for _ in range(3)]
            runs[("nginx", "nonstream", endpoint, c)] = [_run("nginx", **{"bottleneck": "nginx CPU"} | wide)]
        for mode in ("relay", "direct"):
            runs[("stream", endpoint, 64, mode)] = [_run(mode, 0.7, **{"cpu_us_per_req": 170.0} | wide)]
            for streams in (1, 32):
                ttfb = 101.7 if mode == "relay" else 101.2
                runs[("fidelity", endpoint, streams, mode)] = [_fidelity_run(ttfb, 50.4, streams)]
        runs[("nginx", "stream", endpoint, 64)] = [_run("nginx", **{"bottleneck": "nginx CPU"} | wide)]
    runs[("floor", "app")] = [_run("floor", cpu_us_per_req=21.2, bottleneck="floor app CPU")]
    runs[("floor", "client")] = [_run("floor", cpu_us_per_req=77.1, bottleneck="floor client CPU")]
    runs[("lag", "request body 16 MiB")] = [_lag_run(14.9, 149.2 if extreme else 1.0) for _ in range(5)]
    runs[("lag", "SSE event 8 MiB")] = [_lag_run(5.6, 1.1) for _ in range(5)]
    runs[("fleet", "chat", 64, "relay3")] = [_run("relay3", **{"cpu_us_per_req": 128.0} | wide)]
    for mode in ("process_cap", "cluster_cap"):
        runs[("cluster", mode)] = [_run(mode, **{"cpu_us_per_req": 81.0 if mode == "process_cap" else 119.0} | wide)]
    identity = {f"{e} {kind}": {"identical": True, "relay": {}, "direct": {}} for e in ENDPOINTS
                for kind in ("non-stream", "stream")}  # fmt: skip
    extra = {
        "relay_idle_rss_mib_at_start": 47.1,
        "identity": identity,
        "many_streams": {
            "streams": 10_000, "completed": 9_986 if extreme else 10_000, "peak_open": 10_000,
            "errors": {"502 Too many open files": 14} if extreme else {}, "seconds": 16.0, "stream_seconds": 5.0,
            "events_per_stream": 10, "relay_idle_rss_mib": 63.9, "relay_peak_rss_mib": 377.2,
            "relay_rss_after_mib": 370.0, "relay_cpu_seconds": 10.5, "fd_limit": 20_000, "relay_fds_needed": 20_064,
        },
        "nginx": {"binary": "/usr/sbin/nginx", "version": "nginx/1.22.1", "chat non-stream identical": True,
                  "chat stream identical": True, "responses non-stream identical": False},
        "fleet": {
            "affinity": {"with_affinity": 1.0, "without_affinity": 0.334},
            "drill": {"seconds": 30.0, "concurrency": 256, "requests": 123_456, "client_errors": 3,
                      "error_kinds": {"status 502": 2, "ServerDisconnectedError": 1}, "ejected_after_ms": 12.3},
        },
    }  # fmt: skip
    settings = {
        "quick": False, "duration_s": 1.0, "cpu_duration_s": 2.5, "repeats": 3, "concurrency": [1, 16, 64, 256],
        "stream_concurrency": 64, "stream_events": 20, "floor_concurrency": 64,
        "fidelity": {"events": 10, "delay_ms": 100, "event_delay_ms": 50, "streams": [1, 32]},
        "request_bytes": 1024,
        "lag": {"target_ms": 20.0, "request_bytes": 16 << 20, "event_bytes": 8 << 20, "idle_s": 0.25,
                "margin_s": 0.2},
        "generator": "wrk", "generator_version": "wrk debian/4.1.0-3+b2 [epoll]",
        "cores": {"relay": [1], "upstream_and_generator": [0], "pinned": True},
        "fd_limit": 20_000, "relay_argv": "-m relay serve --config /tmp/x/relay.yaml --workers 1",
    }  # fmt: skip
    machine = {
        "cores": 2, "usable_cores": [0, 1], "cpu_model": "AMD EPYC 7B13 64-Core Processor with a long model name",
        "memory_gib": 23.5, "kernel": "6.18.44", "python": "3.11.7",
        "versions": {"relay": "0.1.0", "uvicorn": "0.55.0", "aiohttp": "3.14.5", "httptools": "0.9.0",
                     "uvloop": "0.23.0", "starlette": "1.10.0", "orjson": "3.13.0"},
        "load_average_at_start": [1.07, 1.1, 0.97], "load_average_at_end": [1.2, 1.2, 1.05],
    }  # fmt: skip
    log = ["WARNING relay.upstream: " + "x" * 300] if extreme else []
    outcome = results.assemble(runs, extra, settings, machine, log)
    outcome["started_at"] = "2026-12-03T13:41:02+00:00"
    return outcome


@pytest.mark.parametrize("extreme", [False, True], ids=["typical", "extreme"])
def test_tables_fit_in_120_columns(extreme: bool) -> None:
    outcome = _outcome(extreme=extreme)
    assert outcome["fleet"] and "skipped" not in outcome["cluster"] and outcome["nginx"]["cells"]
    if extreme:
        assert len(outcome["warnings"]) > 5 and max(len(w) for w in outcome["warnings"]) > 120
    text = report.tables(outcome)
    too_wide = [line for line in text.splitlines() if len(line) > report.WIDTH]
    assert not too_wide, "\n".join(too_wide)


def test_tables_keep_the_quoted_figures() -> None:
    text = report.tables(_outcome())
    for figure in (
        "relay/", "+p50", "+p99", "direct", "req/s", "us/req", "CPU %", "RSS MiB", "upstream",
        "generator", "others'", "limited by", "relay CPU", "upstream+generator core",  # the table headers
        "0.22",  # relay/direct at c=16
        "+0.25", "+0.45",  # added p50/p99 at c=1
        "8,000", "37,000",  # req/s relay, direct
        "60.5",  # RSS
        "22/57", "17/45",  # upstream and generator CPU % r/d
        "= 1.032x (target <= 1.05x)",  # fleet: 128 / 124 us
        "Cluster-wide cap",
    ):  # fmt: skip
        assert figure in text, figure
    # Names left-aligned, figures right-aligned: a row starts with its name and ends with a figure's last digit.
    row = next(line for line in text.splitlines() if line.startswith("chat ") and line.endswith("0/0"))
    assert row.split()[:2] == ["chat", "1"]


def test_warnings_wrap_with_a_hanging_indent() -> None:
    text = report.tables(_outcome(extreme=True))
    lines = text.splitlines()
    warnings = lines[lines.index("WARNINGS:") + 1 :]
    assert warnings[0].startswith("  - ")
    assert all(line.startswith("  - ") or line.startswith("    ") for line in warnings)
    assert any(line.startswith("    ") and line.strip() for line in warnings)


def test_plot_writes_a_png(tmp_path: Any) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "x.png"
    report.plot(_outcome(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plot_without_fleet_cluster_or_floor(tmp_path: Any) -> None:
    """An older result (no fleet, cluster or floor rows) still plots."""
    pytest.importorskip("matplotlib")
    outcome = _outcome()
    outcome["fleet"], outcome["cluster"], outcome["floor"] = {}, {"skipped": "redis-server is not installed"}, {}
    path = tmp_path / "x.png"
    report.plot(outcome, path)
    assert path.stat().st_size > 10_000
