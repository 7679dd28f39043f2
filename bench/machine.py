"""What the figures were measured on: cores, CPU model, memory, kernel, and the versions that matter."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

# The versions behind the figures README.md quotes: written when README's figures are, read by every run
# so that one on other versions says so (nothing is pinned just for the figures).
PUBLISHED = Path(__file__).with_name("published.json")

_PACKAGES = ("relay", "uvicorn", "aiohttp", "httptools", "uvloop", "starlette", "orjson")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return 0.0


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe() -> dict[str, Any]:
    versions = {name: _version(name) for name in _PACKAGES}
    return {
        "cores": os.cpu_count(),
        "usable_cores": sorted(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "memory_gib": _mem_total_gib(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "versions": versions,
        "unlike_published": unlike_published(versions),
        "load_average_at_start": os.getloadavg(),
    }


def unlike_published(versions: dict[str, str | None]) -> str | None:
    """A line naming the versions that differ from those README's figures were measured with, if any."""
    try:
        published = json.loads(PUBLISHED.read_text())["versions"]
    except (OSError, ValueError, KeyError):
        return None
    differ = [f"{name} {versions.get(name)} (README's: {was})" for name, was in published.items() if versions.get(name) != was]
    return f"installed versions differ from those of README's figures: {', '.join(differ)}" if differ else None
