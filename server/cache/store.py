"""The narrow Redis interface the engine uses, guarded by timeouts and a circuit breaker.

Every method either answers or raises CacheUnavailable quickly: a Redis fault must never fail a read,
so the engine turns CacheUnavailable into a database read with `x-cache: bypass`. Keys given to and
returned by this class are the engine's (`post:p1`); where they live in Redis, on one server or on a
Redis Cluster, is the KeyLayout's business. On a cluster, multi-key work goes in one script call per
hash slot, in parallel.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from server.cache import scripts
from server.cache.breaker import BreakerState, CircuitBreaker
from server.cache.layout import KeyLayout

_LOGGER = logging.getLogger(__name__)
_T = TypeVar("_T")
_Arg = bytes | str | int
_FAILURE_LOG_INTERVAL_S = 5.0
EVENT_CHANNEL = "events"


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
    """Laid-out keys, guarded calls. Construct with `connect`."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        *,
        layout: KeyLayout,
        breaker_failures: int,
        breaker_cooldown_s: float,
    ) -> None:
        self.redis = redis
        self.layout = layout
        self.prefix = layout.prefix
        self.channel = layout.prefix + EVENT_CHANNEL
        self.stats = StoreStats()
        self.breaker = CircuitBreaker(
            failure_threshold=breaker_failures, cooldown_s=breaker_cooldown_s, probe=self._probe
        )
        self._lease = redis.register_script(scripts.LEASE)
        self._fill = redis.register_script(scripts.FILL)
        self._release = redis.register_script(scripts.RELEASE)
        self._invalidate = redis.register_script(scripts.INVALIDATE)
        self._bump = redis.register_script(scripts.BUMP_GENERATION)
        self._last_failure_log = 0.0
        self._suppressed_failures = 0

    async def _probe(self) -> None:
        # On a cluster, a failure may mean a master died and a replica took its slots: re-read the
        # slot map, or the client would keep asking the dead node and the breaker would never stay
        # closed. Then one ping says whether Redis answers.
        if isinstance(self.redis, RedisCluster):
            await self.redis.nodes_manager.initialize()
        await self.redis.ping()

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
        cluster: bool = False,
    ) -> RedisStore:
        """A store over a new connection pool (or cluster client); no I/O until the first call."""
        timeout_s = timeout_ms / 1000
        redis: Redis | RedisCluster
        if cluster:
            # The cluster client follows MOVED and ASK redirects itself, and refreshes its slot map
            # after a failover; the breaker still guards against a cluster that cannot answer.
            redis = RedisCluster.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                max_connections=max_connections,
            )
        else:
            # A blocking pool: a burst beyond max_connections waits up to the timeout for a
            # connection, where the default pool would fail at once and open the breaker on a healthy
            # Redis. One retry, on a new connection, for a connection error only: after a Redis restart
            # or a proxy's reset every pooled connection is dead, and without it their first uses would
            # open the breaker on a Redis that answers. Never for a timeout: that would double the wait
            # on a frozen Redis, where the breaker is the retry policy. (Each script is safe to repeat.)
            pool = BlockingConnectionPool.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                max_connections=max_connections,
                timeout=timeout_s,
            )
            redis = Redis(connection_pool=pool)
        return cls(
            redis,
            layout=KeyLayout(prefix, cluster=cluster),
            breaker_failures=breaker_failures,
            breaker_cooldown_s=breaker_cooldown_ms / 1000,
        )

    @property
    def breaker_state(self) -> BreakerState:
        """Whether Redis is currently being used."""
        return self.breaker.state

    async def mget(self, keys: Sequence[str]) -> tuple[int, list[bytes | None]]:
        """The namespace generation and the raw values of keys (None where absent), in one round trip."""
        names = [self.layout.generation(), *(self.layout.value(key) for key in keys)]
        values = await self._guarded(lambda: self._values(names))
        generation = int(values[0]) if values[0] is not None else await self._first_generation()
        return generation, values[1:]

    async def event_sequences(self) -> dict[str, int]:
        """The last number of every event counter: where a new subscriber's gap detection starts."""
        counters = self.layout.counters()
        values = await self._guarded(lambda: self._values(counters))
        return {counter: int(value or 0) for counter, value in zip(counters, values, strict=True)}

    async def _values(self, names: Sequence[str]) -> list[bytes | None]:
        # One MGET; on a cluster one per slot, sent together.
        if isinstance(self.redis, RedisCluster):
            return cast(list[bytes | None], await self.redis.mget_nonatomic(names))
        # Without decode_responses the client returns bytes, never str.
        return cast(list[bytes | None], await self.redis.mget(names))

    async def generation(self) -> int:
        """The namespace generation: entries written in another one are ignored."""
        value = await self._guarded(lambda: self.redis.get(self.layout.generation()))
        return int(value) if value is not None else await self._first_generation()

    async def _first_generation(self) -> int:
        # A missing generation (a new Redis, or the key was lost) starts from the clock, never from 0,
        # so entries written under an earlier generation can never come back to life.
        key = self.layout.generation()
        await self._guarded(lambda: self.redis.set(key, int(time.time()), nx=True))
        return int(await self._guarded(lambda: self.redis.get(key)) or 0)

    async def bump_generation(self) -> int:
        """Invalidate every key at once, in O(1): returns the new generation."""
        key = self.layout.generation()
        args: list[_Arg] = [self.channel, self.layout.counter(key)]
        return int(await self._guarded(lambda: self._bump(keys=[key], args=args)))

    async def lease(
        self, requests: Sequence[LeaseRequest], *, lease_ms: int, now_ms: int, generation: int
    ) -> list[LeaseResult]:
        """Ask for many leases: one script call (one per hash slot on a cluster)."""

        async def call(group: list[int]) -> list[Any]:
            keys: list[str] = []
            args: list[_Arg] = [lease_ms, now_ms, generation]
            for index in group:
                request = requests[index]
                keys += [self.layout.value(request.key), self.layout.lease(request.key)]
                keys += [self.layout.tag(tag) for tag in request.tags]
                args += [request.token, "1" if request.force else "0", len(request.tags)]
            return cast(list[Any], await self._lease(keys=keys, args=args))

        replies = await self._per_slot([request.key for request in requests], call)
        return [_lease_result(reply) for reply in replies]

    async def fill(self, fills: Sequence[Fill]) -> list[bool]:
        """Write values (one script call per slot); those with a token only if their lease holds it."""

        async def call(group: list[int]) -> list[Any]:
            keys: list[str] = []
            first = self.layout.value(fills[group[0]].key)
            args: list[_Arg] = [self.channel, self.layout.counter(first)]
            for index in group:
                fill = fills[index]
                keys += [self.layout.value(fill.key), self.layout.lease(fill.key)]
                keys += [self.layout.tag(tag) for tag in fill.tags]
                args += [fill.token, fill.value, fill.ttl_ms, len(fill.tags)]
            return cast(list[Any], await self._fill(keys=keys, args=args))

        return [bool(reply) for reply in await self._per_slot([fill.key for fill in fills], call)]

    async def release(self, leases: Sequence[tuple[str, str]], *, error_ms: int) -> None:
        """Give up leases (key, token) after a failed load, leaving an error mark for error_ms."""
        if not leases:
            return

        async def run() -> None:
            for key, token in leases:
                value = self.layout.value(key)
                args: list[_Arg] = [token, error_ms, self.channel, value, self.layout.counter(value)]
                await self._release(keys=[self.layout.lease(key)], args=args)

        await self._guarded(run)

    async def invalidate(self, keys: Sequence[str], tags: Sequence[str]) -> int:
        """Delete keys, their leases, and every member of the tag sets; returns the values deleted.

        Atomic on a single Redis; on a cluster, atomic within each hash slot.
        """
        groups: dict[int, tuple[list[str], list[str]]] = {}
        for key in keys:
            name = self.layout.value(key)
            groups.setdefault(self.layout.slot(name), ([], []))[0].append(name)
        for tag in tags:
            name = self.layout.tag(tag)
            groups.setdefault(self.layout.slot(name), ([], []))[1].append(name)
        if not groups:
            return 0

        async def call(values: list[str], tag_sets: list[str]) -> int:
            counter = self.layout.counter((values or tag_sets)[0])
            args: list[_Arg] = [len(values), scripts.LEASE_SUFFIX, self.channel, counter]
            return int(await self._invalidate(keys=[*values, *tag_sets], args=args))

        async def run() -> list[int]:
            return list(await asyncio.gather(*(call(*group) for group in groups.values())))

        return sum(await self._guarded(run))

    async def close(self) -> None:
        """Stop the breaker's probe and close the connections."""
        await self.breaker.close()
        await self.redis.aclose()

    async def _per_slot(
        self, keys: Sequence[str], call: Callable[[list[int]], Awaitable[list[Any]]]
    ) -> list[Any]:
        # Group request indexes by the slot of their value key, run one call per group, and put the
        # replies back in request order.
        if not keys:
            return []
        groups: dict[int, list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault(self.layout.slot(self.layout.value(key)), []).append(index)

        async def run() -> list[list[Any]]:
            return list(await asyncio.gather(*(call(group) for group in groups.values())))

        replies: list[Any] = [None] * len(keys)
        for group, group_replies in zip(groups.values(), await self._guarded(run), strict=True):
            for index, reply in zip(group, group_replies, strict=True):
                replies[index] = reply
        return replies

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
