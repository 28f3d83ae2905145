"""`cacheaside stats`: one server's Prometheus metrics, scraped and summed up for a person to read.

It reads the same /metrics endpoint Prometheus does (CACHEASIDE_METRICS_LISTEN on the server), so the
numbers are the ones on the dashboard; with `serve --workers N`, each worker has its own endpoint.
"""

from __future__ import annotations

import urllib.request
from collections import defaultdict
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

DEFAULT_METRICS_URL = "http://127.0.0.1:9464/metrics"


def scrape(url: str, *, timeout_s: float) -> str:
    """The text of a /metrics endpoint."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # an operator's URL, any scheme
        return str(response.read().decode())


def summarize(text: str) -> dict[str, Any]:
    """What an operator asks first: calls by status, cache outcomes, Redis, database, warming."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))

    def total(name: str, **match: str) -> float:
        return sum(v for labels, v in samples[name] if all(labels.get(k) == m for k, m in match.items()))

    def nested(name: str, outer: str, inner: str) -> dict[str, dict[str, int]]:
        found: dict[str, dict[str, int]] = defaultdict(dict)
        for labels, value in samples[name]:
            found[labels[outer]][labels[inner]] = int(value)
        return dict(sorted(found.items()))

    outcomes = {
        o: int(total("cacheaside_cache_outcomes_total", outcome=o)) for o in ("hit", "miss", "bypass")
    }
    reads = sum(outcomes.values())
    loads = total("cacheaside_db_load_duration_seconds_count")
    load_s = total("cacheaside_db_load_duration_seconds_sum")
    return {
        "requests": nested("cacheaside_rpc_requests_total", "rpc", "code"),
        "cache": {
            **outcomes,
            "hit_ratio": round(outcomes["hit"] / reads, 4) if reads else None,
            "by_rpc": nested("cacheaside_cache_outcomes_total", "rpc", "outcome"),
        },
        "redis": {
            "up": bool(total("cacheaside_redis_up")),
            "breaker_open": bool(total("cacheaside_redis_breaker_open")),
            "breaker_opened": int(total("cacheaside_redis_breaker_opened_total")),
            "failed_calls": int(total("cacheaside_redis_calls_total", result="failed")),
        },
        "database": {
            "up": bool(total("cacheaside_database_up")),
            "loads": int(loads),
            "load_errors": int(total("cacheaside_db_loads_total", result="error")),
            "mean_load_ms": round(load_s / loads * 1000, 3) if loads else None,
        },
        "invalidations": {
            "calls": int(total("cacheaside_invalidations_total")),
            "keys": int(total("cacheaside_invalidated_keys_total")),
        },
        "warming": {
            "runs_ok": int(total("cacheaside_warm_runs_total", result="ok")),
            "runs_failed": int(total("cacheaside_warm_runs_total", result="failed")),
            "posts": int(total("cacheaside_warmed_items_total", kind="post")),
            "users": int(total("cacheaside_warmed_items_total", kind="user")),
        },
    }


def render(summary: dict[str, Any]) -> str:
    """The summary as a few readable lines."""
    cache, redis, database = summary["cache"], summary["redis"], summary["database"]
    ratio = "n/a" if cache["hit_ratio"] is None else f"{cache['hit_ratio']:.1%}"
    breaker = "OPEN" if redis["breaker_open"] else "closed"
    lines = ["requests:"]
    for rpc, codes in summary["requests"].items():
        lines.append(f"  {rpc:<22} " + "  ".join(f"{code} {count}" for code, count in sorted(codes.items())))
    lines += [
        f"cache:         hit ratio {ratio}"
        f"  (hit {cache['hit']}, miss {cache['miss']}, bypass {cache['bypass']})",
        f"redis:         {'up' if redis['up'] else 'DOWN'}, breaker {breaker}"
        f" (opened {redis['breaker_opened']} times), {redis['failed_calls']} failed calls",
        f"database:      {'up' if database['up'] else 'DOWN'}, {database['loads']} loads"
        f" ({database['load_errors']} failed), mean {database['mean_load_ms'] or 0} ms",
        f"invalidations: {summary['invalidations']['calls']} calls, {summary['invalidations']['keys']} keys",
        f"warming:       {summary['warming']['runs_ok']} runs ok, {summary['warming']['runs_failed']} failed,"
        f" {summary['warming']['posts']} posts, {summary['warming']['users']} users",
    ]
    return "\n".join(lines)
