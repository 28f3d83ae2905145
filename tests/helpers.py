"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from server.cache import envelope
from server.config import Settings, Tier


async def call(method: Any, request: Any, **kwargs: Any) -> tuple[Any, dict[str, str]]:
    """Call a unary method; return the response and its metadata (initial and trailing, in one dict)."""
    pending = method(request, **kwargs)
    response = await pending
    return response, dict(await pending.initial_metadata()) | dict(await pending.trailing_metadata())


async def error_of(method: Any, request: Any) -> tuple[grpc.StatusCode, str, str]:
    """Call a unary method that must fail; return its code, details and ErrorInfo reason."""
    pending = method(request)
    try:
        await pending
    except grpc.aio.AioRpcError as error:
        status = rpc_status.from_call(error)
        reason = ""
        if status is not None:
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    assert info.domain == "cacheaside"
                    reason = info.reason
        return error.code(), error.details() or "", reason
    raise AssertionError(f"{request!r} succeeded")


async def until(condition: Callable[[], bool], *, timeout_s: float = 10.0) -> None:
    """Yield to other tasks until condition holds: for progress that is certain, not a race to win."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110  (the condition is a counter, not an event we own)
            await asyncio.sleep(0.001)


async def until_async(condition: Callable[[], Awaitable[object]], *, timeout_s: float = 10.0) -> None:
    """Like until, for a condition that must be awaited (a Redis lookup)."""
    async with asyncio.timeout(timeout_s):
        while not await condition():  # noqa: ASYNC110  (polls Redis, which has no event to await)
            await asyncio.sleep(0.005)


def ttl_band_ms(settings: Settings, tier: Tier) -> tuple[int, int]:
    """The range a tier's TTL may take after jitter."""
    base = settings.ttl_s(tier) * 1000
    spread = base * settings.ttl_jitter_pct / 100
    return int(base - spread) - 5000, int(base + spread) + 1  # slack: the time since the fill


async def freshness_ms(redis_client: aioredis.Redis, key: str) -> tuple[int, int]:
    """How long a cached key stays fresh (its envelope's expiry) and how long Redis keeps it (PTTL)."""
    raw = await redis_client.get(key)
    assert raw is not None, f"{key} is not cached"
    entry = envelope.unpack(raw)
    assert entry is not None
    return entry.expires_at_ms - int(time.time() * 1000), await redis_client.pttl(key)


async def assert_tier_ttl(redis_client: aioredis.Redis, settings: Settings, key: str, tier: Tier) -> None:
    """The key is fresh for its tier's TTL, and Redis keeps it max-stale longer for stale-if-error."""
    fresh, kept = await freshness_ms(redis_client, key)
    low, high = ttl_band_ms(settings, tier)
    assert low <= fresh <= high, (key, fresh, (low, high))
    stale_ms = settings.max_stale_s * 1000
    assert low + stale_ms <= kept <= high + stale_ms, (key, kept)


@contextlib.asynccontextmanager
async def posts_locked(engine: AsyncEngine) -> AsyncIterator[None]:
    """Hold an exclusive lock on posts (PostgreSQL): every read of it waits until the block exits."""
    async with engine.connect() as connection:
        transaction = await connection.begin()
        await connection.execute(text("LOCK TABLE posts IN ACCESS EXCLUSIVE MODE"))
        try:
            yield
        finally:
            await transaction.rollback()


async def posts_lock_waiters(engine: AsyncEngine) -> list[int]:
    """The backends (pids) whose query of posts waits on a lock: held by posts_locked, say."""
    async with engine.connect() as connection:
        found = await connection.execute(
            text("SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%posts%'")
        )
        return list(found.scalars())
