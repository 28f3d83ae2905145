"""Graceful fallback: a Redis fault never fails a read; a database fault is UNAVAILABLE, clearly said."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server.cache.breaker import BreakerState
from server.config import Settings
from server.embedded_redis import EmbeddedRedis, free_port
from tests.conftest import Database, Running, start_service, stop_service
from tests.data import add_post, add_user
from tests.helpers import call, error_of, posts_lock_waiters, posts_locked, until_async

BREAKER_FAILURES = 3


@pytest.fixture
async def private_redis() -> AsyncIterator[EmbeddedRedis]:
    """A redis-server this test may stop, freeze and restart."""
    with EmbeddedRedis() as redis_server:
        yield redis_server


@pytest.fixture
async def fragile(
    settings: Settings, db_engine: AsyncEngine, private_redis: EmbeddedRedis
) -> AsyncIterator[Running]:
    """A service on the private Redis, with a fast breaker probe."""
    await add_user(db_engine, "alice")
    for n in range(5):
        await add_post(db_engine, f"p{n}", "alice", title=f"title {n}")
    running = await start_service(
        settings,
        redis_url=private_redis.url,
        redis_breaker_failures=BREAKER_FAILURES,
        redis_breaker_cooldown_ms=50,
        redis_timeout_ms=100,
    )
    yield running
    await stop_service(running)


async def _wait_for_breaker_to_close(running: Running) -> None:
    # Bounded: the background probe runs every 50 ms here.
    async with asyncio.timeout(10):
        await running.app.engine.store.breaker.wait_closed()


async def _reads_all_bypass(running: Running, count: int) -> None:
    for n in range(count):
        post_id = f"p{n % 5}"
        response, meta = await call(running.stub.GetPost, pb.GetPostRequest(post_id=post_id))
        assert response.post.title == f"title {n % 5}"
        assert meta["x-cache"] == "bypass"


async def test_redis_stopped_mid_test_reads_bypass_without_waiting_then_caching_resumes(
    fragile: Running, private_redis: EmbeddedRedis
) -> None:
    _, meta = await call(fragile.stub.GetPost, pb.GetPostRequest(post_id="p0"))
    assert meta["x-cache"] == "miss"
    _, meta = await call(fragile.stub.GetPost, pb.GetPostRequest(post_id="p0"))
    assert meta["x-cache"] == "hit"

    private_redis.stop()
    stats = fragile.app.engine.store.stats
    attempts_before = stats.attempts
    await _reads_all_bypass(fragile, 30)
    # Only the calls that opened the breaker asked Redis; the rest skipped it without waiting.
    assert stats.attempts - attempts_before <= BREAKER_FAILURES
    assert stats.skipped >= 30 - BREAKER_FAILURES
    assert fragile.app.engine.store.breaker_state is BreakerState.OPEN
    for rpc, request in (
        ("GetTrending", pb.GetTrendingRequest()),
        ("GetUser", pb.GetUserRequest(user_id="alice", view=pb.USER_VIEW_FULL)),
        ("BatchGetPosts", pb.BatchGetPostsRequest(post_ids=["p1", "p2"])),
        ("ListPostsByAuthor", pb.ListPostsByAuthorRequest(author_id="alice")),
    ):
        _, meta = await call(getattr(fragile.stub, rpc), request)
        assert meta["x-cache"] == "bypass", rpc

    code, details, reason = await error_of(fragile.stub.Invalidate, pb.InvalidateRequest(post_ids=["p0"]))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "CACHE_UNAVAILABLE")
    assert "nothing was invalidated" in details

    private_redis.start()  # same port, empty
    await _wait_for_breaker_to_close(fragile)
    _, meta = await call(fragile.stub.GetPost, pb.GetPostRequest(post_id="p0"))
    assert meta["x-cache"] == "miss"
    _, meta = await call(fragile.stub.GetPost, pb.GetPostRequest(post_id="p0"))
    assert meta["x-cache"] == "hit"


async def test_a_redis_restart_between_calls_fails_no_call_and_leaves_the_breaker_closed(
    fragile: Running, private_redis: EmbeddedRedis
) -> None:
    async def read_all() -> set[str]:
        calls = [call(fragile.stub.GetPost, pb.GetPostRequest(post_id=f"p{n % 5}")) for n in range(10)]
        return {meta["x-cache"] for _, meta in await asyncio.gather(*calls)}

    await read_all()  # several pooled connections, all to the Redis about to go
    private_redis.stop()
    private_redis.start()  # same port, empty: every pooled connection is dead
    stats = fragile.app.engine.store.stats
    failures = stats.failures
    # Each dead connection fails once and is replaced on the spot: a miss, never a bypass.
    assert await read_all() <= {"miss", "hit"}
    assert stats.failures == failures
    assert fragile.app.engine.store.breaker_state is BreakerState.CLOSED


async def test_a_frozen_redis_costs_only_the_breakers_timeouts(
    fragile: Running, private_redis: EmbeddedRedis
) -> None:
    await call(fragile.stub.GetPost, pb.GetPostRequest(post_id="p0"))
    process = private_redis._process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)
    try:
        stats = fragile.app.engine.store.stats
        failures_before = stats.failures
        await _reads_all_bypass(fragile, 20)
        assert stats.failures - failures_before <= BREAKER_FAILURES, "each call must not wait for a timeout"
    finally:
        os.kill(process.pid, signal.SIGCONT)
    await _wait_for_breaker_to_close(fragile)
    _, meta = await call(fragile.stub.GetPost, pb.GetPostRequest(post_id="p3"))
    assert meta["x-cache"] in {"miss", "hit"}


async def test_unreadable_cache_bytes_are_a_miss_not_an_error(
    fragile: Running, private_redis: EmbeddedRedis
) -> None:
    client = aioredis.Redis.from_url(private_redis.url)
    try:
        await client.set(fragile.prefix + "post:p1", b"\xff garbage")
        await client.sadd(fragile.prefix + "post:p2", "wrong type")
    finally:
        await client.aclose()
    response, meta = await call(fragile.stub.GetPost, pb.GetPostRequest(post_id="p1"))
    assert (response.post.title, meta["x-cache"]) == ("title 1", "miss")
    response, meta = await call(fragile.stub.GetPost, pb.GetPostRequest(post_id="p2"))
    assert response.post.title == "title 2"


async def test_an_unreachable_database_is_unavailable_with_a_clear_message(
    settings: Settings, database: Database, tmp_path: os.PathLike[str]
) -> None:
    if database.kind == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/missing-dir/none.db"
    else:
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/test"
    running = await start_service(settings, database_url=url, db_timeout_ms=1000)
    try:
        code, details, reason = await error_of(running.stub.GetPost, pb.GetPostRequest(post_id="p1"))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
        assert "database is unreachable" in details
        # Invalidate needs only Redis, so it still works while the database is down.
        response, _ = await call(running.stub.Invalidate, pb.InvalidateRequest(post_ids=["p1"]))
        assert response.keys_invalidated == 0
    finally:
        await stop_service(running)


async def test_a_query_the_database_cancels_is_unavailable_not_unknown(
    postgres_only: None, service: Running, db_engine: AsyncEngine
) -> None:
    # A statement cancelled by PostgreSQL (an operator, a statement_timeout: SQLSTATE 57014) comes back
    # as a plain DBAPIError, as does "the database system is shutting down" (57P03).
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice")

    async with posts_locked(db_engine):
        read = asyncio.ensure_future(error_of(service.stub.GetPost, pb.GetPostRequest(post_id="p1")))
        await until_async(lambda: posts_lock_waiters(db_engine))
        (waiting,) = await posts_lock_waiters(db_engine)
        async with db_engine.connect() as connection:
            await connection.execute(text("SELECT pg_cancel_backend(:pid)"), {"pid": waiting})
        code, details, reason = await read
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
    assert "canceling statement" in details


async def test_warming_with_redis_down_is_unavailable_on_both_warm_rpcs(
    fragile: Running, private_redis: EmbeddedRedis
) -> None:
    # Warming must write to Redis: without it both RPCs say so, through the unary and the streaming
    # error table, rather than report a warm that did not happen.
    private_redis.stop()
    code, details, reason = await error_of(fragile.stub.Warm, pb.WarmRequest(popular_posts=5))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "CACHE_UNAVAILABLE")
    assert "nothing more was warmed" in details

    request = pb.WarmWithProgressRequest(warm=pb.WarmRequest(popular_posts=5))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in fragile.stub.WarmWithProgress(request):
            pass
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "nothing more was warmed" in (raised.value.details() or "")
