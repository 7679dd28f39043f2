"""What a relay process does when it starts serving and when it stops."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any

from relay.seams.uvicorn_internals import install_log_filter

log = logging.getLogger("relay")

Lifespan = Callable[[Any], contextlib.AbstractAsyncContextManager[None]]


def lifespan(
    opens: Sequence[Callable[[], Awaitable[None]]],
    closes: Sequence[Callable[[], Awaitable[None] | None]],
    tasks: Sequence[Callable[[], Coroutine[Any, Any, None]]],
    flush_metrics: Callable[[], None] | None,
    summary: str,
) -> Lifespan:
    """Start: the process limits, then each of `opens` (connection pools), then the background `tasks`
    (the metrics flusher, the active probe), then the summary line. Stop: the tasks, then each of
    `closes`, then a last flush (the last requests, into the files other workers' scrapes read)."""

    @asynccontextmanager
    async def run(_: object) -> AsyncIterator[None]:
        install_log_filter()
        _warn_without_head_limits()
        _raise_open_file_limit()
        _tune_garbage_collector()
        for open_ in opens:
            await open_()
        running = [_start(task()) for task in tasks]
        log.info("%s", summary)
        try:
            yield
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)  # a dead one was logged as it died
            for close in closes:
                await _close(close)
            if flush_metrics is not None:
                flush_metrics()

    return run


def _start(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    task = asyncio.create_task(coroutine, name=coroutine.__qualname__)
    task.add_done_callback(_report_death)
    return task


def _report_death(task: asyncio.Task[None]) -> None:
    # A background task runs until shutdown: ending before it, with or without an error, is a bug whose
    # cost (no more probes, metrics or lease renewals) must not stay silent.
    if task.cancelled():
        return
    error = task.exception()
    log.error("relay: background task %s ended early; restart the relay", task.get_name(), exc_info=error)


async def _close(close: Callable[[], Awaitable[None] | None]) -> None:
    """One close; its failure is logged and the other closes still run (pools, capture, cluster leases)."""
    try:
        result = close()
        if result is not None:
            await result
    except Exception:
        log.exception("relay: shutdown step %s failed", getattr(close, "__qualname__", close))


def _warn_without_head_limits() -> None:
    # uvicorn imports its --http class before the lifespan starts, and nothing in the app imports
    # relay.protocol (tests/unit/test_layout.py keeps it so): if it is not loaded, uvicorn serves without it.
    if "relay.protocol" not in sys.modules:
        log.warning(
            "relay: request_head_timeout and max_header_bytes are not enforced: uvicorn runs without the "
            "relay's protocol; use `relay serve`, or pass --http relay.protocol:GuardedHttpToolsProtocol"
        )


def _tune_garbage_collector() -> None:
    """Keep the cyclic garbage collector off the hot path.

    With dozens of requests in flight, the objects they hold alive are enough to cross CPython's default
    threshold of 700 tracked allocations again and again, so the collector kept walking live requests:
    about a fifth of the relay's CPU in `make bench`. Relayed requests create next to no cyclic garbage
    (reference counting frees them); failed ones do (exceptions and their tracebacks), which the high
    threshold lets pile up to a bounded plateau (+14 MiB in the soak with 10% faults). Freezing what
    startup created keeps the rare full collection from walking the imported modules.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _raise_open_file_limit() -> None:
    """Each relayed request holds two sockets; thousands of streams need more than the usual 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("relay: could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    log.info("relay: open-file limit %d", soft)
