"""Routing over several upstreams as pure logic (relay.ring, relay.health, relay.fleet): spread, weights,
affinity, bounded load, keys that move when the fleet changes, ejection and its back-off."""

from __future__ import annotations

import collections

import pytest

from relay.fleet import Fleet, Member
from relay.health import Health
from relay.ring import Ring
from relay.settings import Routing, Settings
from relay.slots import Slots
from relay.upstream import Upstream

URLS = [f"http://10.0.0.{n}:8000/v1" for n in range(1, 6)]
KEYS = [f"conversation-{n}".encode() for n in range(3000)]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fleet(count: int = 3, weights: list[int] | None = None, clock: Clock | None = None, **routing: object) -> Fleet:
    settings = Settings(openai_base_url=URLS[0], openai_api_key="k", openai_model="m")
    members = [
        Member(Upstream(url, "k", settings), {}, Health(3, 2.0, 60.0, clock or Clock()), Slots(None), weight)
        for url, weight in zip(URLS[:count], weights or [1] * count)
    ]
    return Fleet(members, Routing(**routing))  # type: ignore[arg-type]


def test_a_key_always_finds_the_same_upstream_in_any_process() -> None:
    one, other = Ring(URLS[:3], [1, 1, 1], 1.25), Ring(URLS[:3], [1, 1, 1], 1.25)
    assert [one.owner(key) for key in KEYS] == [other.owner(key) for key in KEYS]


def test_keys_spread_by_weight() -> None:
    ring = Ring(URLS[:3], [1, 2, 3], 1.25)
    owners = collections.Counter(ring.owner(key) for key in KEYS * 3)
    for index, weight in enumerate([1, 2, 3]):
        assert owners[index] / len(KEYS * 3) == pytest.approx(weight / 6, abs=0.05)


def test_adding_an_upstream_moves_about_one_in_n_keys() -> None:
    before = Ring(URLS[:4], [1] * 4, 1.25)
    after = Ring(URLS[:5], [1] * 5, 1.25)
    moved = [key for key in KEYS if before.owner(key) != after.owner(key)]
    assert len(moved) / len(KEYS) == pytest.approx(1 / 5, abs=0.05)
    assert all(after.owner(key) == 4 for key in moved)  # only to the new one


def test_bounded_load_spills_a_hot_key_to_the_next_upstream_and_brings_it_back() -> None:
    ring = Ring(URLS[:3], [1, 1, 1], 1.25)
    key = KEYS[0]
    own = ring.owner(key)
    in_flight = [0, 0, 0]
    placed = []
    for _ in range(60):  # the hot key's requests pile up (none finishes)
        index, _ = ring.pick(key, in_flight, lambda i: True)  # type: ignore[misc]
        in_flight[index] += 1
        placed.append(index)
    assert max(in_flight) <= -(-1.25 * 60 // 3) and min(in_flight) > 0
    assert placed[:4] == [own] * 4  # below the floor it does not spill
    assert ring.pick(key, [0, 0, 0], lambda i: True) == (own, True)


def test_weighted_round_robin_among_the_least_loaded() -> None:
    three = fleet(weights=[1, 1, 2])
    picks = collections.Counter(three.choose(None).label for _ in range(400))
    assert [picks[m.label] for m in three.members] == [100, 100, 200]  # idle: in proportion to weight
    three.members[0].in_flight = 5
    three.members[2].in_flight = 6  # 3 per unit of weight
    assert all(three.choose(None) is three.members[1] for _ in range(10))  # the others are loaded: passed over


def test_affinity_keeps_a_key_and_counts_hits() -> None:
    three = fleet()
    first = three.choose(KEYS[7])
    assert all(three.choose(KEYS[7]) is first for _ in range(20)) and three.hits == 21
    assert fleet(affinity="none").choose(KEYS[7]) is not None


def test_an_upstream_is_ejected_after_failures_in_a_row_and_tried_again_later() -> None:
    clock = Clock()
    three = fleet(clock=clock)
    sick = three.choose(KEYS[1])
    for _ in range(3):
        sick.health.sent()
        sick.health.failed()
    assert sick.health.state == "ejected" and sick.health.ejected_for() == 2.0
    assert all(three.choose(key) is not sick for key in KEYS[:200])  # its keys moved
    clock.now += 2.0
    assert sick.health.state == "probing" and three.choose(KEYS[1]) is sick  # half-open: one trial
    sick.health.sent()
    assert three.choose(KEYS[1]) is not sick  # while the trial is out
    assert sick.health.failed()  # the trial failed: ejected again, for longer
    assert sick.health.ejected_for() == 4.0
    clock.now += 4.0
    three.choose(KEYS[1]).health.sent()
    sick.health.succeeded()
    assert sick.health.state == "healthy" and three.choose(KEYS[1]) is sick  # the key is back


def test_backoff_is_capped_and_an_abandoned_trial_frees_the_slot() -> None:
    clock = Clock()
    health = Health(1, 2.0, 10.0, clock)
    for expected in (2.0, 4.0, 8.0, 10.0, 10.0):
        health.sent()
        assert health.failed()
        assert health.ejected_for() == expected
        clock.now += expected
    health.sent()
    health.abandoned()
    assert health.usable()


def test_when_all_are_ejected_the_least_bad_is_tried() -> None:
    clock = Clock()
    three = fleet(clock=clock)
    for offset, member in enumerate(three.members):
        for _ in range(3):
            member.health.failed()
        member.health.until += offset  # ejected 2, 3 and 4 s
    assert not three.ready()
    assert three.choose(None) is three.members[0]


def test_a_failed_over_request_never_returns_to_an_upstream_it_tried() -> None:
    three = fleet()
    first = three.choose(KEYS[3])
    second = three.choose(KEYS[3], (first,))
    third = three.choose(KEYS[3], (first, second))
    assert len({first.label, second.label, third.label}) == 3
