"""Big request bodies are patched in a helper process, so parsing megabytes never stalls other streams."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from relay.body import Rules, patch

log = logging.getLogger("relay")


class Patcher:
    """Patches one endpoint's bodies: inline, or in the process's helper when they are big.

    Parsing and re-serialising megabytes holds the event loop (and, orjson being C that keeps the GIL,
    any thread) for tens of milliseconds, during which no other stream moves. Bodies of at least
    `offload_bytes` are patched in a helper process instead (one per relay process, started on first use):
    `await patcher.patch_in_helper(raw)` when `patcher.is_big(raw)`, else `patcher(raw)`.
    """

    def __init__(self, rules: Rules, offload_bytes: int | None, helper: Helper) -> None:
        self.rules = rules
        self.offload_bytes = offload_bytes
        self.helper = helper

    def __call__(self, raw: bytes) -> tuple[bytes, str | None]:
        """The patched body, and its prompt_cache_key when the rules ask for it."""
        return patch(raw, self.rules)

    def is_big(self, raw: bytes) -> bool:
        return self.offload_bytes is not None and len(raw) >= self.offload_bytes

    async def patch_in_helper(self, raw: bytes) -> tuple[bytes, str | None]:
        return await self.helper.patch(raw, self.rules)


class Helper:
    """The helper process that patches big bodies, started on first use and replaced if it dies."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    async def patch(self, raw: bytes, rules: Rules) -> tuple[bytes, str | None]:
        if self._pool is None:
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(1, mp_context=context, initializer=_start_helper)
        pool = self._pool
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, patch, raw, rules)
        except BrokenProcessPool:
            # The helper died (killed, out of memory): patch this one here, and start a new helper next
            # time (unless a request that failed earlier already did).
            if self._pool is pool:
                log.warning("relay: the body patch helper process died; a new one starts with the next big body")
                self._pool = None
                pool.shutdown(wait=False)
            return patch(raw, rules)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _start_helper() -> None:
    """In the helper process: Ctrl-C and shutdown are the relay's to handle, and the helper must not
    outlive a relay that was killed outright (Linux: the kernel sends it SIGTERM then). It yields the CPU
    to the relay's event loop: where both share a core (a worker pinned, a container of one CPU), a big
    body's patch then slows that one request instead of every stream the loop is relaying."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(10)
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the helper then ends when the relay's pipe to it closes
