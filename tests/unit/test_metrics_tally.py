"""Bulk histogram observations add up exactly as observe() would (relay.metrics.Tally), also when the
fallback to observe() is in use."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram

from relay.metrics import Tally

BUCKETS = (0.01, 0.1, 1.0)
VALUES = [0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 30.0, 0.0]


def samples(histogram: Histogram) -> dict[tuple[str, str], float]:
    return {
        (sample.name, sample.labels.get("le", "")): sample.value
        for metric in histogram.collect()
        for sample in metric.samples
    }


@pytest.mark.parametrize("bulk", [True, False])
def test_tally_matches_observe(bulk: bool) -> None:
    tallied = Histogram("tallied", "t", buckets=BUCKETS, registry=CollectorRegistry())
    observed = Histogram("observed", "o", buckets=BUCKETS, registry=CollectorRegistry())
    tally = Tally(tallied, bulk)
    for value in VALUES:
        tally.add(value)
        observed.observe(value)
    tally.flush()
    tally.flush()  # a second flush adds nothing
    mine = {(name.replace("tallied", ""), le): v for (name, le), v in samples(tallied).items()}
    theirs = {(name.replace("observed", ""), le): v for (name, le), v in samples(observed).items()}
    assert mine == theirs
    assert theirs[("_count", "")] == len(VALUES)
