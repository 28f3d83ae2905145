"""Metrics after a known sequence of calls, the dashboard's queries, request ids and JSON log lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server.config import Settings
from server.logs import JsonFormatter, cached_levels
from server.metrics import Metrics
from server.observability import Observability
from server.tally import Timings
from tests.conftest import Running, start_service, stop_service
from tests.data import add_post, add_user
from tests.helpers import call, error_of

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "cacheaside.json"


async def _scrape(running: Running) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    server = running.app.metrics_server
    assert server is not None, "CACHEASIDE_METRICS_LISTEN was set"

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    samples = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(fetch)):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_count_a_known_sequence_of_calls(settings: Settings, db_engine: AsyncEngine) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice", views=10)
    running = await start_service(settings, metrics_listen="127.0.0.1:0")
    try:
        stub = running.stub
        await call(stub.GetPost, pb.GetPostRequest(post_id="p1"))  # miss
        await call(stub.GetPost, pb.GetPostRequest(post_id="p1"))  # hit
        await error_of(stub.GetPost, pb.GetPostRequest(post_id="nope"))  # miss, NOT_FOUND
        await call(stub.GetUser, pb.GetUserRequest(user_id="alice", view=pb.USER_VIEW_FULL))  # 3 loads
        await error_of(stub.GetTrending, pb.GetTrendingRequest(limit=1000))  # INVALID_ARGUMENT, no fetch
        response, _ = await call(stub.Invalidate, pb.InvalidateRequest(post_ids=["p1"]))
        assert response.keys_invalidated == 1
        await call(stub.Warm, pb.WarmRequest(popular_posts=1, active_users=1))
        await call(stub.GetPost, pb.GetPostRequest(post_id="p1"))  # warmed: hit

        samples = await _scrape(running)
        requests = "cacheaside_rpc_requests_total"
        assert _value(samples, requests, rpc="GetPost", code="OK") == 3
        assert _value(samples, requests, rpc="GetPost", code="NOT_FOUND") == 1
        assert _value(samples, requests, rpc="GetUser", code="OK") == 1
        assert _value(samples, requests, rpc="GetTrending", code="INVALID_ARGUMENT") == 1
        assert _value(samples, requests, rpc="Invalidate", code="OK") == 1
        assert _value(samples, requests, rpc="Warm", code="OK") == 1
        assert _value(samples, "cacheaside_rpc_duration_seconds_count", rpc="GetPost") == 4

        outcomes = "cacheaside_cache_outcomes_total"
        assert _value(samples, outcomes, rpc="GetPost", outcome="miss", tier="warm") == 2
        assert _value(samples, outcomes, rpc="GetPost", outcome="hit", tier="warm") == 2
        assert _value(samples, outcomes, rpc="GetUser", outcome="miss", tier="warm") == 1
        assert not any(name == outcomes and ("rpc", "GetTrending") in labels for name, labels in samples)

        loads = "cacheaside_db_loads_total"
        # Two misses and the warming, which loads through the families' loaders too.
        assert _value(samples, loads, family="post", result="ok") == 3
        assert _value(samples, loads, family="user", result="ok") == 2
        for family in ("user_profile", "user_settings"):
            assert _value(samples, loads, family=family, result="ok") == 1
        assert _value(samples, "cacheaside_db_load_duration_seconds_count", family="post") == 3

        assert _value(samples, "cacheaside_invalidations_total") == 1
        assert _value(samples, "cacheaside_invalidated_keys_total") == 1
        assert _value(samples, "cacheaside_warm_runs_total", result="ok") == 1
        assert _value(samples, "cacheaside_warmed_items_total", kind="post") == 1
        assert _value(samples, "cacheaside_warmed_items_total", kind="user") == 1

        assert _value(samples, "cacheaside_engine_fetches_total", outcome="hit") == 2
        assert _value(samples, "cacheaside_engine_fetches_total", outcome="miss") == 3
        assert _value(samples, "cacheaside_redis_breaker_open") == 0
        assert _value(samples, "cacheaside_redis_calls_total", result="failed") == 0
        assert _value(samples, "cacheaside_database_up") == 1
        assert _value(samples, "cacheaside_redis_up") == 1
    finally:
        await stop_service(running)


async def test_every_dashboard_query_names_a_metric_the_server_exports(
    settings: Settings, db_engine: AsyncEngine
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(expressions) >= 8
    running = await start_service(settings, metrics_listen="127.0.0.1:0")
    try:
        await error_of(running.stub.GetPost, pb.GetPostRequest(post_id="nope"))  # so labelled series exist
        await call(running.stub.Warm, pb.WarmRequest())
        exported = {name for name, _ in await _scrape(running)}
    finally:
        await stop_service(running)
    for expression in expressions:
        for name in re.findall(r"\b(cacheaside_[a-z_]+)", expression):
            assert name in exported, f"the dashboard queries {name}, which the server does not export"


async def test_a_callers_request_id_is_returned_and_a_made_one_only_with_a_failure(service: Running) -> None:
    pending = service.stub.GetTrending(pb.GetTrendingRequest(), metadata=(("x-request-id", "req-42"),))
    await pending
    assert dict(await pending.trailing_metadata())["x-request-id"] == "req-42"
    pending = service.stub.GetTrending(pb.GetTrendingRequest(), metadata=(("x-request-id", "bad id!"),))
    await pending
    assert "x-request-id" not in dict(await pending.trailing_metadata()), "not valid: replaced, not echoed"

    pending = service.stub.GetTrending(pb.GetTrendingRequest())
    await pending
    assert "x-request-id" not in dict(await pending.trailing_metadata()), "succeeded, nothing logged"

    failing = service.stub.GetPost(pb.GetPostRequest(post_id="nope"), metadata=(("x-request-id", "req-43"),))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await failing
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert [v for k, v in raised.value.trailing_metadata() or () if k == "x-request-id"] == ["req-43"]

    made = []
    for bad_input in ("nope", "bad id!"):  # NOT_FOUND, then INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await service.stub.GetPost(pb.GetPostRequest(post_id=bad_input))
        made += [v for k, v in raised.value.trailing_metadata() or () if k == "x-request-id"]
    assert len(made) == 2, "a failure carries its made id, once"
    assert all(re.fullmatch(r"[0-9a-f]{16}-[1-9][0-9]*", one) for one in made)
    assert made[0] != made[1], "a new number"
    assert made[0].split("-")[0] == made[1].split("-")[0], "one process: its prefix"


async def test_logs_are_json_lines_with_the_request_id_and_the_hot_path_logs_nothing(
    service: Running, db_engine: AsyncEngine
) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)  # what production runs at
    try:
        for _ in range(3):
            await call(service.stub.GetPost, pb.GetPostRequest(post_id="p1"))
        assert stream.getvalue() == "", "a successful call logs nothing unless DEBUG is on"

        logging.getLogger("server.observability").setLevel(logging.DEBUG)
        try:
            await call(
                service.stub.GetPost, pb.GetPostRequest(post_id="p1"), metadata=(("x-request-id", "r-7"),)
            )
            _, made = await call(service.stub.GetPost, pb.GetPostRequest(post_id="p1"))
        finally:
            logging.getLogger("server.observability").setLevel(logging.NOTSET)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    assert lines[1]["request_id"] == made["x-request-id"], "under DEBUG, a made id is returned: it was logged"
    line = lines[0]
    assert (line["level"], line["msg"], line["rpc"], line["code"], line["request_id"]) == (
        "DEBUG",
        "rpc ok",
        "GetPost",
        "OK",
        "r-7",
    )
    assert {"ts", "logger", "pid", "ms"} <= set(line)


def test_a_cached_level_answer_is_never_stale() -> None:
    # The hot path skips isEnabledFor only on a cached False: any level change must clear it.
    logger = logging.getLogger("tests.cached_levels")
    parent = logging.getLogger("tests")
    cached = cached_levels(logger)
    logger.setLevel(logging.INFO)
    try:
        assert cached(logging.DEBUG) is None, "not asked yet"
        assert not logger.isEnabledFor(logging.DEBUG)
        assert cached(logging.DEBUG) is False
        logger.setLevel(logging.NOTSET)  # now the parent's level decides
        assert cached(logging.DEBUG) is None
        parent.setLevel(logging.DEBUG)
        assert logger.isEnabledFor(logging.DEBUG)
        assert cached(logging.DEBUG) is True
        logging.disable(logging.DEBUG)
        assert cached(logging.DEBUG) is None, "logging.disable clears it too"
    finally:
        logging.disable(logging.NOTSET)
        logger.setLevel(logging.NOTSET)
        parent.setLevel(logging.NOTSET)


def test_tallies_expose_what_prometheus_client_would() -> None:
    # The per-call families are plain numbers (server/tally.py); a scrape must not tell the difference.
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from server.tally import CountFamily, TimingsFamily

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    buckets = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
    counts = CountFamily("x_calls", "Calls.", ["rpc", "code"], registry=ours)
    reference_counts = Counter("x_calls", "Calls.", ["rpc", "code"], registry=theirs)
    timings = TimingsFamily("x_seconds", "Time.", ["rpc"], buckets=buckets, registry=ours)
    reference_timings = Histogram("x_seconds", "Time.", ["rpc"], buckets=buckets, registry=theirs)
    # On a bound, between bounds, below the first, past the last: bounds are inclusive, as in Prometheus.
    for rpc, code, seconds in [
        ("GetPost", "OK", 0.0005),
        ("GetPost", "OK", 0.0007),
        ("GetPost", "NOT_FOUND", 0.0001),
        ("GetUser", "OK", 7.5),
        ("GetUser", "OK", 5.0),
    ]:
        counts.labels(rpc, code).inc()
        reference_counts.labels(rpc, code).inc()
        timings.labels(rpc).observe(seconds)
        reference_timings.labels(rpc).observe(seconds)

    def exposition(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return sorted(line for line in text.splitlines() if "_created" not in line)

    assert exposition(ours) == exposition(theirs)
    assert counts.labels("GetPost", "OK").value == 2


def test_a_successful_calls_duration_lands_in_the_bucket_the_histogram_would_pick() -> None:
    # succeeded() counts a duration at or under the first bound itself (the hit's usual case) and
    # leaves the others to Timings.observe: both must give the histogram one would get from observe.
    metrics = Metrics()
    _, succeeded, _ = Observability(metrics).observer("GetPost")
    timings = metrics.rpc_duration.labels("GetPost")
    expected = Timings(timings.bounds)
    ago_s = (0.0, 0.003, 0.3, 10.0)  # far from every bound: the clock's own steps cannot move a bucket
    for ago in ago_s:
        succeeded(None, time.perf_counter() - ago)  # type: ignore[arg-type]  # no context under INFO
        expected.observe(ago)
    assert timings.counts == expected.counts
    assert (timings.counts[0], timings.counts[-1]) == (1, 1), "one in the first bucket, one past the last"
    assert sum(ago_s) <= timings.sum < sum(ago_s) + 0.1
    assert metrics.rpc_requests.labels("GetPost", "OK").value == len(ago_s)
