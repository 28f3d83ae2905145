"""The consistency audit: rows changed behind the cache's back are found, counted, logged and aged.

Automatic invalidation is off in these tests, so a row changed in the database stays wrong in the
cache until the test invalidates it. Each test runs audit passes itself; the grace wait and the clock
are the auditor's own, replaced where a test needs them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine

from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server.audit import ConsistencyAuditor
from server.cache import envelope
from server.config import Settings
from tests.conftest import Running, start_service, stop_service
from tests.data import add_post, add_user, set_post, set_user
from tests.helpers import call, error_of


@pytest.fixture
async def audited(
    settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> AsyncIterator[Running]:
    """A service whose audit never runs on its own (the tests run passes), with no grace wait."""
    await add_user(db_engine, "alice")
    for post_id in ("p1", "p2"):
        await add_post(db_engine, post_id, "alice", title=f"{post_id} version 1")
    running = await start_service(settings, audit_interval_s=3600, audit_grace_ms=0, audit_samples=50)
    yield running
    await stop_service(running)


def auditor_of(running: Running) -> ConsistencyAuditor:
    """The running service's auditor."""
    assert running.app.auditor is not None, "CACHEASIDE_AUDIT_INTERVAL_S is set"
    return running.app.auditor


def metric(running: Running, name: str) -> float | None:
    """One sample of the service's metrics."""
    return running.app.metrics.registry.get_sample_value(name)


async def read_everything(running: Running) -> None:
    """Cache p1, p2, alice (all three parts of the FULL view) and the trending list."""
    for post_id in ("p1", "p2"):
        await call(running.stub.GetPost, pb.GetPostRequest(post_id=post_id))
    await call(running.stub.GetUser, pb.GetUserRequest(user_id="alice", view=pb.USER_VIEW_FULL))
    await call(running.stub.GetTrending, pb.GetTrendingRequest())


async def test_a_cache_that_matches_the_database_audits_clean(audited: Running) -> None:
    await read_everything(audited)
    auditor = auditor_of(audited)
    assert await auditor.run_once() == []
    assert auditor.stats.sampled >= 4  # p1, p2, trending, and a part of alice's FULL view
    assert auditor.stats.divergent == 0
    assert metric(audited, "cacheaside_audit_sampled_total") == auditor.stats.sampled
    assert metric(audited, "cacheaside_audit_divergent_total") == 0
    assert metric(audited, "cacheaside_audit_oldest_divergence_seconds") == 0


async def test_a_row_changed_behind_the_cache_is_counted_and_logged_until_invalidated(
    audited: Running, db_engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    await read_everything(audited)
    await error_of(audited.stub.GetPost, pb.GetPostRequest(post_id="late"))  # a cached NOT_FOUND
    await set_post(db_engine, "p1", title="p1 version 2")
    await set_user(db_engine, "alice", name="Alice renamed")
    await add_post(db_engine, "late", "alice")
    auditor = auditor_of(audited)
    auditor.rng.seed(0)

    with caplog.at_level(logging.WARNING, logger="server.audit"):
        divergent = await auditor.run_once()
    # The trending list holds p1's old title too; alice's basic part holds her old name.
    assert {"post:p1", "post:late", "posts:trending"} <= set(divergent)
    assert auditor.stats.divergent == len(divergent)
    assert metric(audited, "cacheaside_audit_divergent_total") == len(divergent)
    logged = {record.key: record for record in caplog.records if hasattr(record, "key")}
    assert set(logged) == set(divergent)
    assert "cached post:p1 differs from the database" in logged["post:p1"].getMessage()
    assert (logged["post:late"].cached_row, logged["post:late"].database_row) == (False, True)
    assert logged["post:p1"].expires_in_s > 0

    await call(audited.stub.Invalidate, pb.InvalidateRequest(post_ids=["p1", "late"], user_ids=["alice"]))
    await read_everything(audited)
    assert await auditor.run_once() == []
    assert metric(audited, "cacheaside_audit_oldest_divergence_seconds") == 0


async def test_a_difference_that_invalidation_clears_within_the_grace_is_not_divergence(
    settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice")
    running = await start_service(settings, audit_interval_s=3600, audit_grace_ms=1000)
    try:
        await call(running.stub.GetPost, pb.GetPostRequest(post_id="p1"))
        await set_post(db_engine, "p1", title="changed")
        auditor = auditor_of(running)
        waits: list[float] = []

        async def invalidation_arrives(seconds: float) -> None:
            # The grace period is where the invalidation lag goes: the writer's Invalidate lands.
            waits.append(seconds)
            await call(running.stub.Invalidate, pb.InvalidateRequest(post_ids=["p1"]))

        auditor.sleep = invalidation_arrives
        assert await auditor.run_once() == []
        assert waits == [1.0], "the suspect was looked at again after the grace period"
        assert (auditor.stats.sampled, auditor.stats.divergent) == (1, 0)
    finally:
        await stop_service(running)


async def test_a_divergence_that_outlives_the_longest_ttl_is_counted_as_a_bug(
    audited: Running, db_engine: AsyncEngine, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await call(audited.stub.GetPost, pb.GetPostRequest(post_id="p1"))
    await set_post(db_engine, "p1", title="p1 version 2")
    auditor = auditor_of(audited)
    started = auditor.clock()
    assert await auditor.run_once() == ["post:p1"]
    assert auditor.stats.past_ttl == 0

    # Past the longest TTL, a buggy writer has put the old value back with a fresh expiry (a stale
    # set would): the key has been wrong all along, though no single fill lived that long.
    settings = audited.app.settings
    longest_ttl_s = settings.ttl_cold_s * (1 + settings.ttl_jitter_pct / 100)
    later = started + longest_ttl_s + 10
    auditor.clock = lambda: later
    key = audited.prefix + "post:p1"
    old = envelope.unpack(await redis_client.get(key))
    assert old is not None
    refilled = envelope.pack(
        old.payload, generation=old.generation, load_ms=1, expires_at_ms=int((later + 60) * 1000)
    )
    await redis_client.set(key, refilled)

    with caplog.at_level(logging.ERROR, logger="server.audit"):
        assert await auditor.run_once() == ["post:p1"]
    assert auditor.stats.past_ttl == 1
    assert metric(audited, "cacheaside_audit_divergent_past_ttl_total") == 1
    oldest = metric(audited, "cacheaside_audit_oldest_divergence_seconds")
    assert oldest is not None
    assert oldest > longest_ttl_s
    assert any("longer than the longest TTL" in record.getMessage() for record in caplog.records)

    assert await auditor.run_once() == ["post:p1"]
    assert auditor.stats.past_ttl == 1, "each key is counted once"
