"""The narrow Redis interface the engine uses, guarded by timeouts and a circuit breaker.

Every method either answers or raises CacheUnavailable quickly: a Redis fault must never fail a read,
so the engine turns CacheUnavailable into a database read with `x-cache: bypass`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from server.cache import scripts
from server.cache.breaker import BreakerState, CircuitBreaker

_LOGGER = logging.getLogger(__name__)
_T = TypeVar("_T")
_FAILURE_LOG_INTERVAL_S = 5.0


class CacheUnavailable(Exception):
    """Redis could not be used for this call (error, timeout, or breaker open)."""


@dataclass(frozen=True, slots=True)
class Fill:
    """One key to write: its value, TTL, and the tag sets it joins (unprefixed names)."""

    key: str
    value: bytes
    ttl_ms: int
    tags: tuple[str, ...] = ()


@dataclass(slots=True)
class StoreStats:
    """Counters for tests and metrics: how often Redis was asked, failed, or skipped."""

    attempts: int = 0
    failures: int = 0
    skipped: int = 0


class RedisStore:
    """Prefixed keys, guarded calls. Construct with `connect`."""

    def __init__(self, redis: Redis, *, prefix: str, breaker_failures: int, breaker_cooldown_s: float):
        self._redis = redis
        self.prefix = prefix
        self.stats = StoreStats()
        self.breaker = CircuitBreaker(
            failure_threshold=breaker_failures, cooldown_s=breaker_cooldown_s, probe=redis.ping
        )
        self._fill = redis.register_script(scripts.FILL)
        self._invalidate = redis.register_script(scripts.INVALIDATE)
        self._last_failure_log = 0.0
        self._suppressed_failures = 0

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        prefix: str,
        timeout_ms: int,
        max_connections: int,
        breaker_failures: int,
        breaker_cooldown_ms: int,
    ) -> RedisStore:
        """A store over a new connection pool; no I/O happens until the first call."""
        timeout_s = timeout_ms / 1000
        # No retries inside redis-py: a retry doubles the wait on a dead Redis, and the breaker
        # is the retry policy here.
        redis = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            max_connections=max_connections,
        )
        return cls(
            redis,
            prefix=prefix,
            breaker_failures=breaker_failures,
            breaker_cooldown_s=breaker_cooldown_ms / 1000,
        )

    @property
    def breaker_state(self) -> BreakerState:
        """Whether Redis is currently being used."""
        return self.breaker.state

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """The raw values of keys, None where absent; one round trip."""
        prefixed = [self.prefix + key for key in keys]
        # Without decode_responses the client returns bytes, never str.
        return cast(list[bytes | None], await self._guarded(lambda: self._redis.mget(prefixed)))

    async def fill(self, fills: Sequence[Fill]) -> None:
        """Write the values, each with its TTL and tags, in one pipelined round trip."""
        if not fills:
            return

        async def run() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                for fill in fills:
                    key = self.prefix + fill.key
                    if fill.tags:
                        tags = [self.prefix + tag for tag in fill.tags]
                        await self._fill(keys=[key, *tags], args=[fill.value, fill.ttl_ms], client=pipe)
                    else:
                        pipe.set(key, fill.value, px=fill.ttl_ms)
                await pipe.execute()

        await self._guarded(run)

    async def invalidate(self, keys: Sequence[str], tags: Sequence[str]) -> int:
        """Delete keys and every member of the tag sets, atomically; returns how many existed."""
        all_keys = [self.prefix + key for key in keys] + [self.prefix + tag for tag in tags]
        if not all_keys:
            return 0
        result = await self._guarded(lambda: self._invalidate(keys=all_keys, args=[len(keys)]))
        return int(result)

    async def close(self) -> None:
        """Stop the breaker's probe and close the pool."""
        await self.breaker.close()
        await self._redis.aclose()

    async def _guarded(self, call: Callable[[], Awaitable[_T]]) -> _T:
        if not self.breaker.allows():
            self.stats.skipped += 1
            raise CacheUnavailable("redis circuit breaker is open")
        self.stats.attempts += 1
        try:
            result = await call()
        except (TimeoutError, RedisError, OSError) as exc:
            self.stats.failures += 1
            self.breaker.record_failure()
            self._log_failure(exc)
            raise CacheUnavailable(str(exc) or type(exc).__name__) from exc
        self.breaker.record_success()
        return result

    def _log_failure(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_failure_log < _FAILURE_LOG_INTERVAL_S:
            self._suppressed_failures += 1
            return
        _LOGGER.warning(
            "redis call failed, falling back to the database: %r (%d similar failures not logged)",
            exc,
            self._suppressed_failures,
        )
        self._last_failure_log = now
        self._suppressed_failures = 0
