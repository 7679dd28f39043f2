"""Every use of a dependency's private or undocumented API, behind named functions with contracts.

One module per dependency; the rest of the relay calls only what these modules export. Each module has a
`problems()` that checks the installed release against what its functions assume (names, signatures,
attributes, behaviour) and returns one line per mismatch, naming the seam, and an `untested_version()`.
`check()` runs them at start-up: a mismatch stops the relay with one line (prometheus-client's has a
fallback, observe(), and only warns); a release other than the tested one is logged as a warning.
tests/unit/test_seams.py runs them all on every `make test` and `make test-latest`, so a new release of a
dependency fails there first, naming the seam.

  aiohttp_internals     the upstream call: connector.connect, the response protocol, StreamReader
  uvicorn_internals     the guarded protocol's base class and cycle, uvicorn's unfinished-response log line
  prometheus_internals  bulk histogram observations (falls back to observe() when they no longer fit)
"""

from __future__ import annotations

import logging

from relay.seams import aiohttp_internals, prometheus_internals, uvicorn_internals

log = logging.getLogger("relay")
SEAMS = (aiohttp_internals, uvicorn_internals, prometheus_internals)


class SeamError(RuntimeError):
    """An installed dependency no longer matches what the relay relies on."""


def check() -> None:
    """Raise SeamError naming the first mismatch that has no fallback; warn of untested releases."""
    for module in (aiohttp_internals, uvicorn_internals):
        problems = module.problems()
        if problems:
            raise SeamError(f"{problems[0]} (pyproject.toml pins the tested versions; see relay/seams/)")
    for module in SEAMS:
        untested = module.untested_version()
        if untested is not None:
            log.warning("relay: %s; tests/unit/test_seams.py says whether it still fits", untested)
