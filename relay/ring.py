"""Consistent hashing with bounded load: where a conversation's requests go among several upstreams.

Each upstream owns POINTS x weight points on a ring of 64-bit hashes (blake2b of its URL and the point's
number, so every process and host builds the same ring). A key goes to the first upstream clockwise from
its own hash; adding or removing one upstream moves only the keys of the arcs it gains or loses, about
1/N of them. Bounded load (Mirrokni, Thorup, Zadimoghaddam, 2018): an upstream whose in-flight count is
at its bound, ceil(load_factor x (in flight + 1) x its share of the weight), is passed over for the next
one on the ring, so one hot key never overloads its upstream; the key comes back once it is under. The
bound is never below FLOOR requests per unit of weight.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Callable, Sequence

POINTS = 160  # per unit of weight: keys spread within a few percent of the weights
# Below this many requests in flight per unit of weight no upstream counts as overloaded: at low load the
# bound's rounding would move conversations for nothing (and cost their cache hits).
FLOOR = 4


def key_hash(key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


class Ring:
    def __init__(self, names: Sequence[str], weights: Sequence[int], load_factor: float) -> None:
        """`names` identify the upstreams (their URLs); the ring answers with their indexes."""
        points = sorted(
            (key_hash(f"{name}#{point}".encode()), index)
            for index, (name, weight) in enumerate(zip(names, weights))
            for point in range(POINTS * weight)
        )
        self._hashes = [point for point, _ in points]
        self._owners = [index for _, index in points]
        self._shares = [weight / sum(weights) for weight in weights]
        self._floors = [FLOOR * weight for weight in weights]
        self._load_factor = load_factor
        self._count = len(names)

    def owner(self, key: bytes) -> int:
        """The upstream a key belongs to, whatever the load."""
        return self._owners[bisect.bisect(self._hashes, key_hash(key)) % len(self._owners)]

    def pick(self, key: bytes, in_flight: Sequence[int], usable: Callable[[int], bool]) -> tuple[int, bool] | None:
        """The first usable upstream clockwise from `key` that is under its load bound, and whether it is
        the key's own (False: the key spilled over); None when none is usable and under its bound."""
        total = sum(in_flight) + 1  # this request counts
        start = bisect.bisect(self._hashes, key_hash(key))
        owners = self._owners
        seen = 0
        first = True
        for step in range(len(owners)):
            index = owners[(start + step) % len(owners)]
            if seen & (1 << index):
                continue
            seen |= 1 << index
            bound = max(math.ceil(self._load_factor * total * self._shares[index]), self._floors[index])
            if usable(index) and in_flight[index] < bound:
                return index, first
            first = False
            if seen == (1 << self._count) - 1:
                break
        return None
