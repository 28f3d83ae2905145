"""The narrow Redis interface the engine uses, guarded by timeouts and a circuit breaker.

Every method either answers or raises CacheUnavailable quickly: a Redis fault must never fail a read,
so the engine turns CacheUnavailable into a database read with `x-cache: bypass`. Keys given to and
returned by this class are unprefixed; the prefix is added here only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from server.cache import scripts
from server.cache.breaker import BreakerState, CircuitBreaker

_LOGGER = logging.getLogger(__name__)
_T = TypeVar("_T")
_Arg = bytes | str | int
_FAILURE_LOG_INTERVAL_S = 5.0
FILL_CHANNEL = "events"
EVENT_COUNTER = "events:seq"
GENERATION_KEY = "generation"  # bumped to invalidate everything at once


class CacheUnavailable(Exception):
    """Redis could not be used for this call (error, timeout, or breaker open)."""


class LeaseKind(StrEnum):
    """What a lease request found."""

    VALUE = "value"  # the key is fresh (someone filled it): here are its bytes
    GRANTED = "granted"  # the caller holds the lease and must load and fill
    WAIT = "wait"  # another caller holds the lease; wait for its fill
    ERROR = "error"  # the last load failed moments ago; do not retry yet


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """Ask for the lease on key; force takes it even when the value is fresh (refresh, warming)."""

    key: str
    token: str
    tags: tuple[str, ...] = ()
    force: bool = False


@dataclass(frozen=True, slots=True)
class LeaseResult:
    """The answer to a LeaseRequest: bytes for VALUE, the lease's remaining ms for WAIT and ERROR."""

    kind: LeaseKind
    value: bytes | None = None
    pttl_ms: int = 0


@dataclass(frozen=True, slots=True)
class Fill:
    """One key to write: its value, TTL, tags, and the lease token it is written under ('' for none)."""

    key: str
    value: bytes
    ttl_ms: int
    tags: tuple[str, ...] = ()
    token: str = ""


@dataclass(slots=True)
class StoreStats:
    """Counters for tests and metrics: how often Redis was asked, failed, or skipped."""

    attempts: int = 0
    failures: int = 0
    skipped: int = 0


class RedisStore:
    """Prefixed keys, guarded calls. Construct with `connect`."""

    def __init__(self, redis: Redis, *, prefix: str, breaker_failures: int, breaker_cooldown_s: float):
        self.redis = redis
        self.prefix = prefix
        self.channel = prefix + FILL_CHANNEL
        self._events = prefix + EVENT_COUNTER
        self._generation_key = prefix + GENERATION_KEY
        self.stats = StoreStats()
        self.breaker = CircuitBreaker(
            failure_threshold=breaker_failures, cooldown_s=breaker_cooldown_s, probe=redis.ping
        )
        self._lease = redis.register_script(scripts.LEASE)
        self._fill = redis.register_script(scripts.FILL)
        self._release = redis.register_script(scripts.RELEASE)
        self._invalidate = redis.register_script(scripts.INVALIDATE)
        self._bump = redis.register_script(scripts.BUMP_GENERATION)
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
        # A blocking pool: a burst beyond max_connections waits up to the timeout for a connection,
        # where the default pool would fail at once and open the breaker on a healthy Redis.
        pool = BlockingConnectionPool.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            max_connections=max_connections,
            timeout=timeout_s,
        )
        redis = Redis(connection_pool=pool)
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

    async def mget(self, keys: Sequence[str]) -> tuple[int, list[bytes | None]]:
        """The namespace generation and the raw values of keys (None where absent), in one round trip."""
        prefixed = [self._generation_key, *(self.prefix + key for key in keys)]
        # Without decode_responses the client returns bytes, never str.
        values = cast(list[bytes | None], await self._guarded(lambda: self.redis.mget(prefixed)))
        generation = int(values[0]) if values[0] is not None else await self._first_generation()
        return generation, values[1:]

    async def generation(self) -> int:
        """The namespace generation: entries written in another one are ignored."""
        value = await self._guarded(lambda: self.redis.get(self._generation_key))
        return int(value) if value is not None else await self._first_generation()

    async def _first_generation(self) -> int:
        # A missing generation (a new Redis, or the key was lost) starts from the clock, never from 0,
        # so entries written under an earlier generation can never come back to life.
        await self._guarded(lambda: self.redis.set(self._generation_key, int(time.time()), nx=True))
        return int(await self._guarded(lambda: self.redis.get(self._generation_key)) or 0)

    async def bump_generation(self) -> int:
        """Invalidate every key at once, in O(1): returns the new generation."""
        args: list[_Arg] = [self.channel, self._events]
        return int(await self._guarded(lambda: self._bump(keys=[self._generation_key], args=args)))

    async def lease(
        self, requests: Sequence[LeaseRequest], *, lease_ms: int, now_ms: int, generation: int
    ) -> list[LeaseResult]:
        """Ask for many leases in one script call."""
        if not requests:
            return []
        keys: list[str] = []
        args: list[_Arg] = [lease_ms, now_ms, generation]
        for request in requests:
            key = self.prefix + request.key
            keys += [key, key + scripts.LEASE_SUFFIX, *(self.prefix + tag for tag in request.tags)]
            args += [request.token, "1" if request.force else "0", len(request.tags)]
        replies = await self._guarded(lambda: self._lease(keys=keys, args=args))
        return [_lease_result(reply) for reply in replies]

    async def fill(self, fills: Sequence[Fill]) -> list[bool]:
        """Write values in one script call; those with a token only if their lease still holds it."""
        if not fills:
            return []
        keys: list[str] = []
        args: list[_Arg] = [self.channel, self._events]
        for fill in fills:
            key = self.prefix + fill.key
            keys += [key, key + scripts.LEASE_SUFFIX, *(self.prefix + tag for tag in fill.tags)]
            args += [fill.token, fill.value, fill.ttl_ms, len(fill.tags)]
        replies = await self._guarded(lambda: self._fill(keys=keys, args=args))
        return [bool(reply) for reply in replies]

    async def release(self, leases: Sequence[tuple[str, str]], *, error_ms: int) -> None:
        """Give up leases (key, token) after a failed load, leaving an error mark for error_ms."""
        if not leases:
            return

        async def run() -> None:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, token in leases:
                    prefixed = self.prefix + key
                    keys = [prefixed + scripts.LEASE_SUFFIX]
                    await self._release(
                        keys=keys, args=[token, error_ms, self.channel, prefixed, self._events], client=pipe
                    )
                await pipe.execute()

        await self._guarded(run)

    async def invalidate(self, keys: Sequence[str], tags: Sequence[str]) -> int:
        """Delete keys, their leases, and every member of the tag sets, atomically; returns values deleted."""
        all_keys = [self.prefix + key for key in keys] + [self.prefix + tag for tag in tags]
        if not all_keys:
            return 0
        args: list[_Arg] = [len(keys), scripts.LEASE_SUFFIX, self.channel, self._events]
        result = await self._guarded(lambda: self._invalidate(keys=all_keys, args=args))
        return int(result)

    async def close(self) -> None:
        """Stop the breaker's probe and close the pool."""
        await self.breaker.close()
        await self.redis.aclose()

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


def _lease_result(reply: Any) -> LeaseResult:
    kind = LeaseKind(reply[0].decode())
    if kind is LeaseKind.VALUE:
        return LeaseResult(kind, value=reply[1])
    if kind is LeaseKind.GRANTED:
        return LeaseResult(kind)
    return LeaseResult(kind, pttl_ms=max(int(reply[1]), 0))
