"""Counters and histograms for the per-call path: plain numbers on the event loop, exported at scrape.

prometheus_client takes a lock on every increment of a child (here about 380 ns an inc and 750 ns an
observe); every call pays three of them. These are changed only on the event loop's thread and read by
the scrape thread, where reading a number needs no lock: 45 ns an inc, 145 ns an observe. The
exposition is the same families, names and labels (without the `_created` samples).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry


class Count:
    """One labelled counter."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        """Add amount (one by default)."""
        self.value += amount


class Timings:
    """One labelled histogram: a count per bucket (upper bounds inclusive, then +Inf) and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one duration. (A caller on the hot path may count one at or under bounds[0] itself,
        as `counts[0] += 1` and `sum += seconds`, without this call: observability.py.)"""
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds


class CountFamily(Collector):
    """A counter family of Count children, one per label values, registered in registry."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], *, registry: CollectorRegistry
    ) -> None:
        self._name, self._documentation, self._labelnames = name, documentation, list(labelnames)
        self._children: dict[tuple[str, ...], Count] = {}
        registry.register(self)

    def labels(self, *values: str) -> Count:
        """The child for these label values (made on first use); keep it to count without a lookup."""
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = Count()
        return child

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        # A copy first: dict.copy clones the table without allocating per item, so no collection (and no
        # finalizer handing the GIL to the loop, which may add a child) can run halfway through.
        for values, child in self._children.copy().items():
            family.add_metric(list(values), child.value)
        yield family


class TimingsFamily(Collector):
    """A histogram family of Timings children over the same bucket bounds."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name, self._documentation, self._labelnames = name, documentation, list(labelnames)
        self._bounds = tuple(buckets)
        self._children: dict[tuple[str, ...], Timings] = {}
        registry.register(self)

    def labels(self, *values: str) -> Timings:
        """The child for these label values (made on first use)."""
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = Timings(self._bounds)
        return child

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        edges = [*(repr(float(bound)) for bound in self._bounds), "+Inf"]  # as prometheus_client writes them
        for values, child in self._children.copy().items():
            cumulative, buckets = 0, []
            for edge, count in zip(edges, list(child.counts), strict=True):
                cumulative += count
                buckets.append((edge, cumulative))
            family.add_metric(list(values), buckets, sum_value=child.sum)
        yield family
