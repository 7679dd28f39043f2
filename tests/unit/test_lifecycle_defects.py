"""Small defects of the process's own machinery, each pinned by a test: the metrics flusher survives a
failing flush and says so once, and the request-head limits are read from the environment once."""

from __future__ import annotations

import asyncio
import logging

import pytest

from relay import metrics
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


def test_head_limits_are_read_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    head_limits.cache_clear()
    monkeypatch.setenv(HEAD_TIMEOUT_ENV, "7")
    assert head_limits()[0] == 7.0
    monkeypatch.setenv(HEAD_TIMEOUT_ENV, "9")
    assert head_limits()[0] == 7.0  # not read again for each connection
    head_limits.cache_clear()
