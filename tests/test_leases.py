"""Correct under concurrency, in one process: stale sets refused, single-flight, deadlines, XFetch.

Races are forced with the engine's after_load hook, which pauses a loader between its database read
and its fill; nothing here depends on timing luck.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine

from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server.cache import CacheEngine
from server.config import Settings, Tier
from tests.conftest import Running, start_service, stop_service
from tests.data import add_post, add_user, set_post, set_user
from tests.helpers import call, error_of, freshness_ms, ttl_band_ms, until


class LoadGate:
    """Pauses loads of one key after the database read, until released."""

    def __init__(self, engine: CacheEngine, key: str) -> None:
        self.loaded = asyncio.Event()
        self.proceed = asyncio.Event()
        self._key = key
        engine.hooks.after_load = self._pause

    async def _pause(self, keys: Sequence[str]) -> None:
        if self._key in keys and not self.proceed.is_set():
            self.loaded.set()
            await self.proceed.wait()


# (what is read, the request, the change a writer commits, the invalidation, how to see the version)
STALE_SET_CASES: list[
    tuple[str, str, Any, Callable[[AsyncEngine], Awaitable[None]], Any, Callable[[Any], Any]]
] = [
    (
        "user",
        "GetUser",
        pb.GetUserRequest(user_id="alice"),
        lambda db: set_user(db, "alice", name="version 2"),
        pb.InvalidateRequest(user_ids=["alice"]),
        lambda response: response.user.name,
    ),
    (
        "post",
        "GetPost",
        pb.GetPostRequest(post_id="p1"),
        lambda db: set_post(db, "p1", title="version 2"),
        pb.InvalidateRequest(post_ids=["p1"]),
        lambda response: response.post.title,
    ),
    (
        "posts:trending",
        "GetTrending",
        pb.GetTrendingRequest(),
        lambda db: set_post(db, "p1", title="version 2"),
        pb.InvalidateRequest(post_ids=["p1"]),
        lambda response: response.posts[0].title,
    ),
]


@pytest.mark.parametrize(
    ("key_family", "rpc", "request_message", "write", "invalidation", "version_of"),
    STALE_SET_CASES,
    ids=[case[0] for case in STALE_SET_CASES],
)
async def test_a_fill_that_began_before_an_invalidation_is_refused(
    service: Running,
    db_engine: AsyncEngine,
    key_family: str,
    rpc: str,
    request_message: Any,
    write: Callable[[AsyncEngine], Awaitable[None]],
    invalidation: Any,
    version_of: Callable[[Any], Any],
) -> None:
    await add_user(db_engine, "alice", name="version 1")
    await add_post(db_engine, "p1", "alice", title="version 1")
    engine = service.app.engine
    key = {"user": "user:alice", "post": "post:p1", "posts:trending": "posts:trending"}[key_family]
    gate = LoadGate(engine, key)
    method = getattr(service.stub, rpc)

    reader = asyncio.create_task(call(method, request_message))
    await gate.loaded.wait()  # the reader has read version 1 and not yet filled
    await write(db_engine)  # a writer commits version 2 ...
    await call(service.stub.Invalidate, invalidation)  # ... and invalidates
    refused = engine.stats.fills_refused
    gate.proceed.set()
    old, _ = await reader
    assert version_of(old) == "version 1"  # that read began before the write: an honest answer
    assert engine.stats.fills_refused == refused + 1, "the old value must not be written"

    fresh, meta = await call(method, request_message)
    assert version_of(fresh) == "version 2"
    assert meta["x-cache"] == "miss"


async def test_concurrent_misses_in_one_process_share_one_load(
    service: Running, db_engine: AsyncEngine
) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice")
    engine = service.app.engine
    gate = LoadGate(engine, "post:p1")
    loads = engine.stats.loads

    calls = [
        asyncio.create_task(call(service.stub.GetPost, pb.GetPostRequest(post_id="p1"))) for _ in range(50)
    ]
    await gate.loaded.wait()
    await until(lambda: engine.stats.flight_callers == 50)  # every call has missed and joined the flight
    gate.proceed.set()
    responses = await asyncio.gather(*calls)
    assert {response.post.id for response, _ in responses} == {"p1"}
    assert engine.stats.loads == loads + 1
    assert engine.stats.coalesced == 49


async def test_a_caller_past_its_deadline_does_not_cancel_the_shared_load(
    service: Running, db_engine: AsyncEngine
) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice")
    engine = service.app.engine
    gate = LoadGate(engine, "post:p1")
    loads = engine.stats.loads

    hasty = asyncio.create_task(error_of_with_timeout(service, 0.3))
    await gate.loaded.wait()  # the hasty caller started the load, which is now paused
    patient = asyncio.create_task(call(service.stub.GetPost, pb.GetPostRequest(post_id="p1"), timeout=30))
    code, _ = await hasty
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    gate.proceed.set()
    response, _ = await patient
    assert response.post.id == "p1"
    assert engine.stats.loads == loads + 1, "the load survived its first caller"
    _, meta = await call(service.stub.GetPost, pb.GetPostRequest(post_id="p1"))
    assert meta["x-cache"] == "hit"


async def error_of_with_timeout(service: Running, timeout_s: float) -> tuple[grpc.StatusCode, str]:
    """GetPost p1 with a short deadline; the code and details it fails with."""
    try:
        await service.stub.GetPost(pb.GetPostRequest(post_id="p1"), timeout=timeout_s)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    raise AssertionError("the call succeeded")


async def test_without_leases_every_concurrent_miss_loads(
    settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> None:
    # The benchmark's baseline: the seed's plain cache-aside, leases and single-flight off.
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice")
    running = await start_service(settings, leases=False)
    try:
        engine = running.app.engine
        gate = LoadGate(engine, "post:p1")
        calls = [
            asyncio.create_task(call(running.stub.GetPost, pb.GetPostRequest(post_id="p1"))) for _ in range(5)
        ]
        await gate.loaded.wait()
        await until(lambda: engine.stats.loads == 5)
        gate.proceed.set()
        await asyncio.gather(*calls)
        assert engine.stats.loads == 5
    finally:
        await stop_service(running)


async def test_not_found_is_cached_under_leases_and_invalidation_reveals_a_new_row(
    service: Running, db_engine: AsyncEngine
) -> None:
    await add_user(db_engine, "alice")
    code, _, _ = await error_of(service.stub.GetPost, pb.GetPostRequest(post_id="new"))
    assert code == grpc.StatusCode.NOT_FOUND
    await add_post(db_engine, "new", "alice")
    code, _, _ = await error_of(service.stub.GetPost, pb.GetPostRequest(post_id="new"))
    assert code == grpc.StatusCode.NOT_FOUND, "NOT_FOUND is cached until invalidated or expired"
    await call(service.stub.Invalidate, pb.InvalidateRequest(post_ids=["new"]))
    response, _ = await call(service.stub.GetPost, pb.GetPostRequest(post_id="new"))
    assert response.post.id == "new"


async def test_early_refresh_keeps_a_key_fresh_under_steady_reads(
    settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice", title="version 1")
    running = await start_service(settings, ttl_warm_s=60, ttl_jitter_pct=0, xfetch_beta_warm=1000)
    engine = running.app.engine
    start = engine.clock()
    now = start
    engine.clock = lambda: now
    engine.random = lambda: 1 - 1e-9  # -ln(1e-9) ~ 20.7: refresh within ~20 s x load time of expiry
    try:
        _, meta = await call(running.stub.GetPost, pb.GetPostRequest(post_id="p1"))
        assert meta["x-cache"] == "miss"
        await set_post(db_engine, "p1", title="version 2")
        outcomes = []
        for second in range(1, 181):  # three TTLs of steady reads, one a second
            now = start + second
            _, meta = await call(running.stub.GetPost, pb.GetPostRequest(post_id="p1"))
            outcomes.append(meta["x-cache"])
            await engine.drain()  # let a refresh it started finish before the next read
        assert set(outcomes) == {"hit"}, "no read in the window may miss"
        assert engine.stats.early_refreshes >= 3
        response, _ = await call(running.stub.GetPost, pb.GetPostRequest(post_id="p1"))
        assert response.post.title == "version 2", "the refresh reloaded the row"
    finally:
        await stop_service(running)


async def test_ttls_are_jittered_within_the_setting(
    service: Running, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> None:
    await add_user(db_engine, "alice")
    for n in range(60):
        await add_post(db_engine, f"p{n}", "alice", views=n)
    await call(service.stub.Warm, pb.WarmRequest(popular_posts=60, active_users=1))
    fresh = [(await freshness_ms(redis_client, f"{service.prefix}post:p{n}"))[0] for n in range(60)]
    low, high = ttl_band_ms(service.app.settings, Tier.WARM)
    assert all(low <= ttl <= high for ttl in fresh)
    assert max(fresh) - min(fresh) > 0.5 * (high - low) / 2, "warmed keys must not all expire together"
