"""Bulk observations for prometheus-client histograms, which it has no public API for.

prometheus-client's observe() takes two locks and walks the buckets in Python for each value. The relay
counts values per bucket itself (relay.metrics.Tally) and adds each bucket's count in one step at a flush.
Contract (prometheus-client 0.26; checked by problems() and tests/unit/test_seams.py): a histogram child
has `_upper_bounds` (ascending, the last +Inf), `_buckets` (one value per bound, not cumulative, each
with `inc(amount)`) and `_sum` (with `inc(amount)`). When that no longer holds, `bulk_supported()` is
false and the relay calls observe() for each value instead, with a warning at start-up.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Histogram

TESTED = "0.26"


def bucket_bounds(child: Histogram) -> Sequence[float]:
    return child._upper_bounds


def add_observations(child: Histogram, counts: Sequence[int], total: float) -> None:
    """As if observe() had been called counts[i] times with values in bucket i, summing to `total`."""
    buckets = child._buckets
    for index, count in enumerate(counts):
        if count:
            buckets[index].inc(count)
    if total:
        child._sum.inc(total)


def untested_version() -> str | None:
    version = importlib.metadata.version("prometheus-client")
    if ".".join(version.split(".")[:2]) != TESTED:
        return f"prometheus seam: tested with prometheus-client {TESTED}.x, found {version}"
    return None


def bulk_supported() -> bool:
    return not problems()


def problems() -> list[str]:
    try:
        child = Histogram("relay_seam_probe", "probe", buckets=(1.0,), registry=CollectorRegistry())
        bounds = list(bucket_bounds(child))
        add_observations(child, [1, 1], 3.0)
    except (AttributeError, TypeError) as exc:
        return [f"prometheus seam: histogram internals changed ({exc})"]
    samples = {s.name: s.value for metric in child.collect() for s in metric.samples if "le" not in s.labels}
    buckets = [s.value for metric in child.collect() for s in metric.samples if s.name.endswith("_bucket")]
    if bounds != [1.0, float("inf")] or samples.get("relay_seam_probe_sum") != 3.0 or buckets != [1.0, 2.0]:
        return ["prometheus seam: bulk observations no longer add up like observe()"]
    return []
