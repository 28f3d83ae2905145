"""Warm caches exactly what the seed's queries select, with the tiers' TTLs, by RPC and at startup."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis
from google.protobuf.duration_pb2 import Duration
from sqlalchemy.ext.asyncio import AsyncEngine

from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server.config import Settings, Tier
from tests.conftest import Running, start_service, stop_service
from tests.data import add_post, add_user
from tests.helpers import call, freshness_ms, ttl_band_ms


async def _population(engine: AsyncEngine) -> None:
    now = datetime.now(UTC)
    for n in range(60):  # u00..u59 active within the day, u00 most recently
        await add_user(engine, f"u{n:02d}", full=False, last_active_at=now - timedelta(minutes=n + 1))
    for n in range(5):
        await add_user(engine, f"idle{n}", full=False, last_active_at=now - timedelta(days=2, minutes=n))
    await add_user(engine, "never", full=False, last_active_at=None)
    for n in range(25):  # published posts with views 0..24
        await add_post(engine, f"p{n:02d}", "u00", views=n)
    await add_post(engine, "draft", "u00", published=False, views=1_000_000)


async def _cached(redis_client: aioredis.Redis, prefix: str, family: str) -> dict[str, int]:
    keys = [
        key async for key in redis_client.scan_iter(match=f"{prefix}{family}*") if not key.endswith(b":lease")
    ]
    return {
        key.decode()[len(prefix) + len(family) :]: (await freshness_ms(redis_client, key))[0] for key in keys
    }


async def test_warm_defaults_cache_the_seeds_selection_with_tier_ttls(
    service: Running, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> None:
    await _population(db_engine)
    response, _ = await call(service.stub.Warm, pb.WarmRequest())
    assert (response.posts_warmed, response.users_warmed) == (20, 50)

    posts = await _cached(redis_client, service.prefix, "post:")
    assert set(posts) == {f"p{n:02d}" for n in range(5, 25)}  # the 20 most viewed published posts
    users = await _cached(redis_client, service.prefix, "user:")
    assert set(users) == {f"u{n:02d}" for n in range(50)}  # the 50 most recently active within 24 h
    low, high = ttl_band_ms(service.app.settings, Tier.WARM)
    outside = {k: v for k, v in {**posts, **users}.items() if not low <= v <= high}
    assert not outside, outside

    _, meta = await call(service.stub.GetPost, pb.GetPostRequest(post_id="p24"))
    assert meta["x-cache"] == "hit"


async def test_warm_takes_counts_and_a_window(
    service: Running, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> None:
    await _population(db_engine)
    request = pb.WarmRequest(popular_posts=3, active_users=100, active_within=Duration(seconds=10 * 60 + 30))
    response, _ = await call(service.stub.Warm, request)
    assert (response.posts_warmed, response.users_warmed) == (3, 10)
    assert set(await _cached(redis_client, service.prefix, "post:")) == {"p24", "p23", "p22"}
    assert set(await _cached(redis_client, service.prefix, "user:")) == {f"u{n:02d}" for n in range(10)}


async def test_warming_runs_at_startup(
    settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> None:
    await _population(db_engine)
    running = await start_service(settings, warm_on_start=True, warm_posts=4, warm_users=2)
    try:
        assert running.app.startup_warm is not None
        await running.app.startup_warm
        prefix = running.prefix
        assert set(await _cached(redis_client, prefix, "post:")) == {"p24", "p23", "p22", "p21"}
        assert set(await _cached(redis_client, prefix, "user:")) == {"u00", "u01"}
    finally:
        await stop_service(running)


async def test_warm_with_progress_streams_each_batch_then_done(
    settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> None:
    await _population(db_engine)
    running = await start_service(settings, warm_batch=7)
    try:
        request = pb.WarmWithProgressRequest(warm=pb.WarmRequest(popular_posts=25, active_users=20))
        reports = [report async for report in running.stub.WarmWithProgress(request)]
    finally:
        await stop_service(running)
    assert (reports[0].posts_total, reports[0].users_total) == (25, 20)
    done = [report.posts_done + report.users_done for report in reports]
    assert done == sorted(done), "progress only goes forward"
    assert len(reports) == 1 + 4 + 3 + 1  # the plan, 4 post batches, 3 user batches, done
    last = reports[-1]
    assert last.done
    assert (last.posts_warmed, last.users_warmed) == (25, 20)


async def test_warming_keeps_to_its_concurrency(
    settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> None:
    await _population(db_engine)
    # Inline: the hook counts loads in this process, which a warm worker would not run.
    running = await start_service(settings, warm_batch=2, warm_concurrency=2, warm_worker=False)
    in_flight = 0
    most = 0

    async def count(_keys: object) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.005)  # a load that takes a moment, so overlapping batches would show
        in_flight -= 1

    running.app.engine.hooks.after_load = count
    try:
        response, _ = await call(running.stub.Warm, pb.WarmRequest(popular_posts=20, active_users=20))
    finally:
        await stop_service(running)
    assert (response.posts_warmed, response.users_warmed) == (20, 20)
    assert most == 2, "batches overlap, but never more than the setting allows"


async def test_cacheaside_warm_shows_a_progress_bar(service: Running, db_engine: AsyncEngine) -> None:
    await _population(db_engine)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "client.cli",
        "warm",
        "--target",
        service.target,
        "--posts",
        "10",
        "--users",
        "5",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    assert "warmed 10 posts and 5 users" in out.decode()
    assert "warming" in err.decode()
    assert "15/15" in err.decode(), err.decode()
