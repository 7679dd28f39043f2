"""Several upstreams behind one relay: which one each attempt goes to, and what each has in flight.

With a session key (relay.affinity) a request goes where its conversation went before, on a consistent
hash ring with bounded load (relay.ring), so the upstream's prefix cache hits and no hot key overloads
one replica. Without one, by load: smooth weighted round robin (nginx's) among the upstreams whose
requests in flight are within one per unit of weight of the least loaded one's. Upstreams as fast as
each other thus get requests in proportion to their weights at any concurrency (a pure least-in-flight
choice favours light ones while few requests are in flight), and one that slows down, whose requests
pile up, is passed over until it catches up. Ejected upstreams (relay.health) are passed over;
when every one is ejected, the one whose ejection ends first is tried rather than failing everything.
A single upstream takes none of these paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from relay.health import Health
from relay.ring import Ring
from relay.settings import Routing
from relay.slots import Slots
from relay.upstream import Endpoint, Upstream


@dataclass(eq=False)
class Member:
    """One upstream of the fleet: its pool and endpoints, health, counts."""

    upstream: Upstream
    endpoints: dict[str, Endpoint]  # by API path
    health: Health
    slots: Slots | None  # its own cap (max_concurrent_requests of its entry); None: none
    weight: int
    in_flight: int = 0
    current: int = 0  # smooth weighted round robin
    answers: dict[int, int] = field(default_factory=dict)  # status -> count, since the metrics' last flush
    last_error: str | None = None  # the kind of its latest failure
    probed: bool | None = None  # the latest active probe's outcome (None: not probed)

    @property
    def label(self) -> str:
        return self.upstream.label


class Fleet:
    def __init__(self, members: Sequence[Member], routing: Routing) -> None:
        self.members = list(members)
        self.single = self.members[0] if len(self.members) == 1 else None
        self.affinity = routing.affinity != "none" and self.single is None
        self.round_robin = routing.balance == "round_robin"
        self.ring = Ring([m.upstream.base_url for m in self.members], [m.weight for m in self.members], routing.load_factor)
        self.hits = self.spills = 0  # affinity, since the metrics' last flush

    def choose(self, key: bytes | None, tried: Sequence[Member] = ()) -> Member:
        """Where the next attempt goes: never to one already tried for this request while another is left."""
        if self.single is not None:
            return self.single
        members = self.members
        if key is not None and self.affinity:
            picked = self.ring.pick(
                key, [m.in_flight for m in members], lambda i: members[i] not in tried and members[i].health.usable()
            )
            if picked is not None:
                index, own = picked
                if own:
                    self.hits += 1
                else:
                    self.spills += 1
                return members[index]
        candidates = [m for m in members if (not m.health.ejections or m.health.usable()) and m not in tried]
        if not candidates:
            candidates = [m for m in members if m not in tried] or members
            return min(candidates, key=lambda m: m.health.ejected_for())  # the least bad
        return self._balanced(candidates)

    def _balanced(self, candidates: list[Member]) -> Member:
        """Smooth weighted round robin among the least loaded (all of them with balance: round_robin)."""
        if not self.round_robin:
            least = min([m.in_flight / m.weight for m in candidates]) + 1
            candidates = [m for m in candidates if m.in_flight <= least * m.weight]
            if len(candidates) == 1:
                return candidates[0]
        total = 0
        best = candidates[0]
        for member in candidates:
            member.current += member.weight
            total += member.weight
            if member.current > best.current:
                best = member
        best.current -= total
        return best

    def ready(self) -> bool:
        """Can this relay serve? Some upstream is neither ejected (it may be due for its trial) nor failing
        its active probe."""
        return any(m.health.state != "ejected" and m.probed is not False for m in self.members)

    def view(self) -> list[dict[str, object]]:
        """Each upstream's state, for GET /health/upstreams and the readiness answer."""
        return [
            {
                "upstream": m.label,
                "state": m.health.state,
                "in_flight": m.in_flight,
                "failures_in_a_row": m.health.failures,
                "ejected_for_s": round(m.health.ejected_for(), 3),
                "last_error": m.last_error,
                "probe_ok": m.probed,
            }
            for m in self.members
        ]
