"""Where the relay's log lines go, under `relay serve` and under the plain uvicorn CLI alike.

"relay": start-up summary, warnings, errors; with a level, as uvicorn's own lines ("INFO:     ...").
"relay.access": one line per request (access_log: plain or json) on stdout, and nothing else on the line,
so a log shipper can read the JSON form as it is.
"""

from __future__ import annotations

import copy
import logging
import sys
from typing import Any

from uvicorn.config import LOGGING_CONFIG
from uvicorn.logging import DefaultFormatter


def uvicorn_log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging config (for `relay serve`) with the relay's two loggers added."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["relay_access"] = {"format": "%(message)s"}
    config["handlers"]["relay_access"] = {
        "formatter": "relay_access",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stdout",
    }
    config["loggers"]["relay"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    config["loggers"]["relay.access"] = {"handlers": ["relay_access"], "level": "INFO", "propagate": False}
    return config


def attach_to_uvicorn() -> None:
    """Under the plain uvicorn CLI nobody configured the relay's loggers: give them the same form as under
    `relay serve`, at uvicorn's level. A logger that already has handlers (set by the user) is left alone."""
    relay_log = logging.getLogger("relay")
    if not relay_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s", use_colors=None))
        relay_log.addHandler(handler)
        relay_log.setLevel(logging.getLogger("uvicorn.error").getEffectiveLevel())
        relay_log.propagate = False
    access = logging.getLogger("relay.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False
