"""Small defects of the process's own machinery, each pinned by a test: the metrics flusher survives a
failing flush and says so once, a background task that dies is logged and a failing close does not stop
the others, and the request-head limits are read from the environment once."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys

import pytest

from relay import metrics
from relay.lifespan import lifespan
from relay.protocol import HEAD_TIMEOUT_ENV, head_limits


def test_a_failing_flush_is_logged_once_and_the_flusher_keeps_going(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(metrics, "FLUSH_SECONDS", 0.001)
    calls: list[int] = []

    def flush() -> None:
        calls.append(1)
        if 2 <= len(calls) <= 4:
            raise AttributeError("a prometheus-client internal moved")

    async def scenario() -> None:
        task = asyncio.create_task(metrics.keep_flushing(flush))
        while len(calls) < 8:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.WARNING, logger="relay"):
        asyncio.run(scenario())
    messages = [record.getMessage() for record in caplog.records]
    assert sum("handing metrics to prometheus-client failed" in m for m in messages) == 1
    assert sum("handed over again" in m for m in messages) == 1


def test_a_dead_background_task_is_logged_and_a_failing_close_stops_no_other(caplog: pytest.LogCaptureFixture) -> None:
    closed: list[str] = []

    async def renew_leases() -> None:
        raise ConnectionResetError("the store went away")

    async def keep_probing() -> None:
        await asyncio.Event().wait()

    def close_pools() -> None:
        raise RuntimeError("a pool would not close")

    async def close_capture() -> None:
        closed.append("capture")

    async def scenario() -> None:
        run = lifespan([], [close_pools, close_capture], [renew_leases, keep_probing], None, "relay: test")
        async with run(None):
            await asyncio.sleep(0.01)

    with caplog.at_level(logging.INFO, logger="relay"):
        asyncio.run(scenario())
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert [record.getMessage() for record in errors] == [
        "relay: background task test_a_dead_background_task_is_logged_and_a_failing_close_stops_no_other.<locals>.renew_leases ended early; restart the relay",
        "relay: shutdown step test_a_dead_background_task_is_logged_and_a_failing_close_stops_no_other.<locals>.close_pools failed",
    ]
    assert isinstance(errors[0].exc_info[1], ConnectionResetError)
    assert closed == ["capture"]


def test_head_limits_are_read_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    head_limits.cache_clear()
    monkeypatch.setenv(HEAD_TIMEOUT_ENV, "7")
    assert head_limits()[0] == 7.0
    monkeypatch.setenv(HEAD_TIMEOUT_ENV, "9")
    assert head_limits()[0] == 7.0  # not read again for each connection
    head_limits.cache_clear()


def test_a_refusal_with_metrics_off_creates_no_metrics() -> None:
    # In a process of its own: this one may have made the metrics for another test.
    code = (
        "import prometheus_client; from relay.metrics import refused; refused('invalid_host'); "
        "print('relay_' in prometheus_client.generate_latest().decode())"
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert shown.stdout.strip() == "False"
