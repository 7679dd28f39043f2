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
        running = [asyncio.create_task(task()) for task in tasks]
        log.info("%s", summary)
        try:
            yield
        finally:
            for task in running:
                task.cancel()
            for task in running:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for close in closes:
                result = close()
                if result is not None:
                    await result
            if flush_metrics is not None:
                flush_metrics()

    return run


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
