"""The Redis store on its own, against a real Redis."""

from __future__ import annotations

import asyncio
import uuid

from server.cache import RedisStore
from server.cache.breaker import BreakerState


async def test_a_burst_beyond_the_pool_waits_for_connections_instead_of_failing(redis_url: str) -> None:
    store = RedisStore.connect(
        redis_url,
        prefix=f"test-burst-{uuid.uuid4().hex[:8]}:",
        timeout_ms=2000,
        max_connections=4,
        breaker_failures=3,
        breaker_cooldown_ms=1000,
    )
    try:
        results = await asyncio.gather(*(store.mget(["a", "b"]) for _ in range(200)), return_exceptions=True)
        assert not [r for r in results if isinstance(r, BaseException)]
        assert store.stats.failures == 0
        assert store.breaker_state is BreakerState.CLOSED, "a busy pool is not a failing Redis"
    finally:
        await store.redis.delete(store.prefix + "generation")
        await store.close()
