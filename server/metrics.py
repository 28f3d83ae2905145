"""Prometheus metrics: what the service records as it serves, and what it reads from the engine on scrape.

Each App has its own registry, so several servers in one process (tests) never share counts. Counters
the cache engine already keeps (hits, Redis calls, breaker) are read by a collector at scrape time
rather than counted twice on the hot path.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.audit import AuditStats
from server.cache import CacheEngine, Outcome
from server.cache.breaker import BreakerState
from server.domain.catalog import Catalog, with_load_reports
from server.invalidator import OutboxInvalidator
from server.tally import Count, CountFamily, TimingsFamily
from server.warming import WarmResult

# Latency buckets from a cache hit (sub-millisecond) to a database load near its timeout.
_RPC_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_LOAD_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_WARM_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0)

ReadRecorder = Callable[[Outcome, str], None]


class Metrics:
    """Every metric of one server, in its own registry."""

    def __init__(self, *, worker: int | None = None) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        # Counted on every call: plain numbers read at scrape (tally.py), not prometheus_client's locks.
        self.rpc_requests = CountFamily(
            "cacheaside_rpc_requests",
            "Finished RPCs by method and status code.",
            ["rpc", "code"],
            registry=registry,
        )
        self.rpc_duration = TimingsFamily(
            "cacheaside_rpc_duration_seconds",
            "Time from the call reaching the handler to its answer, by method.",
            ["rpc"],
            buckets=_RPC_BUCKETS_S,
            registry=registry,
        )
        self.cache_outcomes = CountFamily(
            "cacheaside_cache_outcomes",
            "Read RPCs by how they were answered (x-cache) and the tier of their key family.",
            ["rpc", "outcome", "tier"],
            registry=registry,
        )
        self.db_loads = Counter(
            "cacheaside_db_loads",
            "Database loads of cache misses, by key family and result (ok or error).",
            ["family", "result"],
            registry=registry,
        )
        self.db_load_duration = Histogram(
            "cacheaside_db_load_duration_seconds",
            "Duration of one database load (one query for all missing ids of a family).",
            ["family"],
            buckets=_LOAD_BUCKETS_S,
            registry=registry,
        )
        self.invalidations = Counter(
            "cacheaside_invalidations", "Invalidate calls that reached Redis.", registry=registry
        )
        self.invalidated_keys = Counter(
            "cacheaside_invalidated_keys", "Cached keys that Invalidate deleted.", registry=registry
        )
        self.warm_runs = Counter(
            "cacheaside_warm_runs",
            "Warming runs (by RPC, at startup or on the interval), by result (ok or failed).",
            ["result"],
            registry=registry,
        )
        self.warmed_items = Counter(
            "cacheaside_warmed_items", "Items written by warming, by kind.", ["kind"], registry=registry
        )
        self.warm_duration = Histogram(
            "cacheaside_warm_duration_seconds",
            "Duration of one warming run.",
            buckets=_WARM_BUCKETS_S,
            registry=registry,
        )
        self.database_up = Gauge(
            "cacheaside_database_up",
            "1 when the last health check reached the database, else 0.",
            registry=registry,
        )
        self.redis_up = Gauge(
            "cacheaside_redis_up", "1 when the last health check reached Redis, else 0.", registry=registry
        )
        worker_info = Gauge(
            "cacheaside_worker",
            "This process: its pid and worker index.",
            ["pid", "worker"],
            registry=registry,
        )
        worker_info.labels(pid=str(os.getpid()), worker="" if worker is None else str(worker)).set(1)
        self._read_recorders: dict[str, ReadRecorder] = {}

    def watch_engine(self, engine: CacheEngine) -> None:
        """Report the engine's own counters (fetches, Redis calls, breaker) at every scrape."""
        self.registry.register(_EngineCollector(engine))

    def watch_invalidator(self, invalidator: OutboxInvalidator) -> None:
        """Report automatic invalidation: changes, reconnections, and the commit-to-invalidation lag."""
        self.registry.register(_InvalidatorCollector(invalidator))

    def watch_audit(self, stats: AuditStats) -> None:
        """Report the consistency audit's findings at every scrape."""
        self.registry.register(_AuditCollector(stats))

    def read_recorder(self, rpc: str) -> ReadRecorder:
        """A function recording one read of `rpc`: resolves its label children once per combination."""
        children: dict[tuple[Outcome, str], Callable[[], None]] = {}
        family = self.cache_outcomes

        def record(outcome: Outcome, tier: str) -> None:
            inc = children.get((outcome, tier))
            if inc is None:
                inc = children[(outcome, tier)] = family.labels(rpc, outcome.value, tier).inc
            inc()

        return record

    def read_counter(self, rpc: str, outcome: Outcome, tier: str) -> Count:
        """One (rpc, outcome, tier) child, to add to in place: for a caller that knows all three ahead."""
        return self.cache_outcomes.labels(rpc, outcome.value, tier)

    def invalidated(self, keys: int) -> None:
        """An Invalidate call deleted `keys` cached keys."""
        self.invalidations.inc()
        self.invalidated_keys.inc(keys)

    def warmed(self, result: WarmResult | None, duration_s: float) -> None:
        """A warming run finished; None means it failed."""
        self.warm_duration.observe(duration_s)
        if result is None:
            self.warm_runs.labels("failed").inc()
            return
        self.warm_runs.labels("ok").inc()
        self.warmed_items.labels("post").inc(result.posts)
        self.warmed_items.labels("user").inc(result.users)

    def timed_catalog(self, catalog: Catalog) -> Catalog:
        """The same catalog, each family's loads counted and timed."""
        return with_load_reports(catalog, self.load_observed)

    def load_observed(self, family: str, ok: bool, seconds: float) -> None:
        """One load of family's rows, by this process or by the warm worker: counted and timed."""
        self.db_load_duration.labels(family).observe(seconds)
        self.db_loads.labels(family, "ok" if ok else "error").inc()

    def serve_http(self, listen: str) -> MetricsServer:
        """Serve /metrics on `host:port` (port 0 picks one) from a daemon thread."""
        host, _, port = listen.rpartition(":")
        httpd, thread = start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)
        return MetricsServer(httpd, thread.join)


@dataclasses.dataclass
class MetricsServer:
    """The running /metrics endpoint."""

    httpd: WSGIServer
    _join: Callable[[], None]

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self.httpd.server_port)

    def stop(self) -> None:
        """Stop serving and release the port."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self._join()


class _EngineCollector(Collector):
    def __init__(self, engine: CacheEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        # Runs on the scrape thread: these are plain int reads, safe without the event loop.
        stats = self._engine.stats
        fetches = CounterMetricFamily(
            "cacheaside_engine_fetches",
            "Engine fetches by outcome (a batch is one fetch; a read answered whole by the near cache "
            "counts as a hit).",
            labels=["outcome"],
        )
        # A read answered whole from the near cache's answers is a hit the engine never saw.
        near_answered = self._engine.near.stats.answered if self._engine.near is not None else 0
        fetches.add_metric([Outcome.HIT.value], stats.hits + near_answered)
        fetches.add_metric([Outcome.MISS.value], stats.misses)
        fetches.add_metric([Outcome.STALE.value], stats.stale)
        fetches.add_metric([Outcome.BYPASS.value], stats.bypasses)
        yield fetches
        flights = CounterMetricFamily(
            "cacheaside_engine_flights",
            "Miss handling: loads coalesced in this process, waits for another caller's lease, fills "
            "refused after an invalidation, early (probabilistic) refreshes, misses refused because "
            "CACHEASIDE_MAX_WAITING_MISSES callers already waited on loads.",
            labels=["event"],
        )
        flights.add_metric(["coalesced"], stats.coalesced)
        flights.add_metric(["lease_wait"], stats.lease_waits)
        flights.add_metric(["fill_refused"], stats.fills_refused)
        flights.add_metric(["early_refresh"], stats.early_refreshes)
        flights.add_metric(["refused_waiting"], stats.misses_refused)
        yield flights
        yield GaugeMetricFamily(
            "cacheaside_misses_waiting",
            "Calls waiting on database loads now; past CACHEASIDE_MAX_WAITING_MISSES a miss is refused.",
            value=self._engine.waiting_misses,
        )
        yield CounterMetricFamily(
            "cacheaside_db_loads_refused",
            "Misses refused at once because every database load slot was taken (DATABASE_SATURATED).",
            value=stats.loads_refused,
        )
        store = self._engine.store
        calls = CounterMetricFamily(
            "cacheaside_redis_calls",
            "Redis calls: attempted, failed (error or timeout), skipped while the breaker was open.",
            labels=["result"],
        )
        calls.add_metric(["attempted"], store.stats.attempts)
        calls.add_metric(["failed"], store.stats.failures)
        calls.add_metric(["skipped"], store.stats.skipped)
        yield calls
        yield GaugeMetricFamily(
            "cacheaside_redis_breaker_open",
            "1 while the Redis circuit breaker is open (reads skip Redis), else 0.",
            value=1 if store.breaker_state is BreakerState.OPEN else 0,
        )
        yield CounterMetricFamily(
            "cacheaside_redis_breaker_opened",
            "How many times the Redis circuit breaker opened.",
            value=store.breaker.opened_count,
        )
        near = self._engine.near
        if near is not None:
            events = CounterMetricFamily(
                "cacheaside_near_cache",
                "Near cache (L1): hits answered without Redis (those answered whole included), entries "
                "admitted, dropped by an event, evicted for room, and whole flushes (new generation, "
                "missed events, lost connection).",
                labels=["event"],
            )
            near_stats = near.stats
            events.add_metric(["hits"], near_stats.hits + near_stats.answered)
            for event in ("admitted", "dropped", "evicted", "flushes"):
                events.add_metric([event], getattr(near_stats, event))
            yield events
            yield CounterMetricFamily(
                "cacheaside_near_cache_answered",
                "Of the near cache's hits, reads answered whole: the same request again, from the response "
                "held for it (CACHEASIDE_NEAR_CACHE_ANSWER_BYTES).",
                value=near_stats.answered,
            )
            yield GaugeMetricFamily(
                "cacheaside_near_cache_answer_bytes",
                "Bytes the near cache's held answers take, their overhead included.",
                value=near.answer_bytes,
            )
            yield GaugeMetricFamily(
                "cacheaside_near_cache_entries", "Entries in the near cache.", value=len(near)
            )


class _InvalidatorCollector(Collector):
    def __init__(self, invalidator: OutboxInvalidator) -> None:
        self._invalidator = invalidator

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._invalidator.stats
        yield CounterMetricFamily(
            "cacheaside_outbox_changes",
            "Committed row changes invalidated from the outbox.",
            value=stats.changes,
        )
        yield CounterMetricFamily(
            "cacheaside_outbox_connects",
            "Connections the outbox listener made (more than one: it reconnected and replayed).",
            value=stats.connects,
        )
        yield GaugeMetricFamily(
            "cacheaside_outbox_connected",
            "1 while the outbox listener is connected to PostgreSQL, else 0.",
            value=1 if self._invalidator.connected.is_set() else 0,
        )
        lag = GaugeMetricFamily(
            "cacheaside_invalidation_lag_ms",
            "Recent lag from a committed write to its invalidation in Redis, by PostgreSQL's clock.",
            labels=["quantile"],
        )
        for quantile in (50, 99):
            value = stats.lag_percentile_ms(quantile)
            if value is not None:
                lag.add_metric([f"0.{quantile}"], value)
        yield lag


class _AuditCollector(Collector):
    def __init__(self, stats: AuditStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._stats
        yield CounterMetricFamily(
            "cacheaside_audit_sampled",
            "Fresh cached entries the consistency audit compared with the database.",
            value=stats.sampled,
        )
        yield CounterMetricFamily(
            "cacheaside_audit_divergent",
            "Compared entries that still differed from the database after the audit's grace period.",
            value=stats.divergent,
        )
        yield CounterMetricFamily(
            "cacheaside_audit_divergent_past_ttl",
            "Cached keys seen to differ from the database for longer than the longest TTL: each is a bug.",
            value=stats.past_ttl,
        )
        yield GaugeMetricFamily(
            "cacheaside_audit_oldest_divergence_seconds",
            "Age (at least) of the oldest divergence the audit still sees; 0 when there is none.",
            value=stats.oldest_divergence_s,
        )
