"""Leases across processes: one load for a stampede over four servers, and takeover after a crash.

The database read is gated by a real table lock held by the test, so every call is known to have
missed before the one load is allowed to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import grpc
import pytest
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine

from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from client.proto.cacheaside.v1 import cache_service_pb2_grpc as pb_grpc
from server.config import Settings
from server.domain.keys import key_prefix
from tests.data import add_post, add_user
from tests.helpers import posts_locked
from tests.procs import ServerProcess

LEASE_TTL_MS = 1500


@contextlib.contextmanager
def servers(settings: Settings, count: int) -> Iterator[list[ServerProcess]]:
    """count server processes sharing the test's Redis prefix and database."""
    started: list[ServerProcess] = []
    try:
        for _ in range(count):
            started.append(ServerProcess(settings))
        yield started
    finally:
        for server in started:
            server.stop()


async def _until(condition_name: str, condition: object, timeout_s: float = 30) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # type: ignore[operator]  # noqa: ASYNC110  (counters in other processes)
            await asyncio.sleep(0.02)


async def test_500_calls_over_4_processes_load_once(
    postgres_only: None, settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "hot", "alice", title="the hot post")
    shared = settings.model_copy(
        update={"db_timeout_ms": 30_000, "lease_ttl_ms": 31_000, "redis_timeout_ms": 2000}
    )
    with servers(shared, 4) as processes:
        channels = [grpc.aio.insecure_channel(p.target) for p in processes]
        stubs = [pb_grpc.CacheServiceStub(channel) for channel in channels]
        try:
            async with posts_locked(db_engine):
                calls = [
                    asyncio.ensure_future(stubs[n % 4].GetPost(pb.GetPostRequest(post_id="hot"), timeout=60))
                    for n in range(500)
                ]
                await _until("all missed", lambda: sum(p.stats()["flight_callers"] for p in processes) == 500)
            responses = await asyncio.gather(*calls)
        finally:
            for channel in channels:
                await channel.close()
        assert {response.post.title for response in responses} == {"the hot post"}
        stats = [p.stats() for p in processes]
    assert sum(s["loads"] for s in stats) == 1, stats
    assert sum(s["lease_waits"] for s in stats) == 3, "the three other processes waited for the fill"


async def test_a_lease_holder_killed_mid_load_is_taken_over(
    postgres_only: None, settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice", title="survivor")
    shared = settings.model_copy(
        update={"lease_ttl_ms": LEASE_TTL_MS, "db_timeout_ms": 1000, "redis_timeout_ms": 2000}
    )
    lease_key = key_prefix(settings.key_prefix) + "post:p1:lease"
    with servers(shared, 2) as (doomed, survivor):
        async with grpc.aio.insecure_channel(doomed.target) as doomed_channel:
            async with posts_locked(db_engine):
                orphan = asyncio.ensure_future(
                    pb_grpc.CacheServiceStub(doomed_channel).GetPost(
                        pb.GetPostRequest(post_id="p1"), timeout=30
                    )
                )
                await _until("the lease is taken", lambda: doomed.stats()["loads"] == 1)
                assert await redis_client.exists(lease_key)
                doomed.kill()  # dies holding the lease, its load unfinished
            with pytest.raises(grpc.aio.AioRpcError):
                await orphan
        async with grpc.aio.insecure_channel(survivor.target) as channel:
            started = time.monotonic()
            response = await pb_grpc.CacheServiceStub(channel).GetPost(
                pb.GetPostRequest(post_id="p1"), timeout=30
            )
            elapsed = time.monotonic() - started
        assert response.post.title == "survivor"
        stats = survivor.stats()
    assert stats["loads"] == 1
    assert stats["lease_waits"] == 1, "the survivor found the dead holder's lease and waited it out"
    assert elapsed < LEASE_TTL_MS / 1000 + 1.0, f"took {elapsed:.2f}s: more than the lease TTL plus one load"
