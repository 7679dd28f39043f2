"""Host names as the relay compares them: a Host value's name and port, and a set of allowed names."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

_CACHE_ENTRIES = 1024


class HostNames:
    """`allows(authority)`: whether a Host value (name, optional port) is one of `names`; an entry
    `*.example.com` allows every name under example.com. Verdicts are remembered per raw value."""

    def __init__(self, names: Iterable[str]) -> None:
        cleaned = {name.strip().lower().strip("[]") for name in names}
        self._exact = frozenset(name.encode("idna") for name in cleaned if not name.startswith("*."))
        self._suffixes = tuple(b"." + name[2:].encode("idna") for name in cleaned if name.startswith("*."))
        self.seen: dict[bytes, bool] = {}

    def allows(self, authority: bytes) -> bool:
        verdict = self.seen.get(authority)
        if verdict is None:
            verdict = self._judge(authority)
            if len(self.seen) >= _CACHE_ENTRIES:  # clients choose the values: start over rather than grow
                self.seen.clear()
            self.seen[authority] = verdict
        return verdict

    def _judge(self, authority: bytes) -> bool:
        split = split_authority(authority)
        if split is None:
            return False
        name = split[0]
        return is_address(name.decode("latin-1")) or name in self._exact or name.endswith(self._suffixes)


def split_authority(value: bytes) -> tuple[bytes, int | None] | None:
    """b"Example.com:8000" -> (b"example.com", 8000); b"[::1]" -> (b"::1", None); None if malformed."""
    value = value.strip().lower()
    if value.startswith(b"["):
        name, bracket, rest = value[1:].partition(b"]")
        if not bracket or (rest and not rest.startswith(b":")):
            return None
        port = rest[1:]
    else:
        name, colon, port = value.partition(b":")
        if colon and not port:
            return None
    if not name or (port and not port.isdigit()):
        return None
    return name, int(port) if port else None


def is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
