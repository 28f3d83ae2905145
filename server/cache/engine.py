"""The cache-aside engine: read through Redis, load misses from a loader, fill, and invalidate.

It knows nothing of users or posts. Callers describe each key family (how ids become keys, which TTL,
which tags, how to load missing ids in one query) and ask for lookups; the engine answers with the
stored payload bytes, ready to go to the wire, and how the answer was obtained.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from server.cache import envelope
from server.cache.store import CacheUnavailable, Fill, RedisStore

Loader = Callable[[Sequence[str]], Awaitable[Mapping[str, bytes]]]
"""Loads the payloads of many ids in one query; ids missing from the result do not exist."""


class Outcome(StrEnum):
    """How a response was obtained; sent to callers as `x-cache`."""

    HIT = "hit"
    MISS = "miss"
    BYPASS = "bypass"


class LoadTimeout(Exception):
    """A loader did not answer within the load timeout."""

    def __init__(self, family: str, timeout_s: float) -> None:
        super().__init__(f"loading {family} took longer than {timeout_s * 1000:.0f} ms")
        self.family = family
        self.timeout_s = timeout_s


@dataclass(frozen=True, slots=True, eq=False)
class Family:
    """A kind of cached value: how its keys are named, how long they live, and how to load them."""

    name: str
    tier: str
    ttl_s: int
    key: Callable[[str], str]
    load: Loader
    tags: tuple[str, ...] = ()


@dataclass(slots=True)
class EngineStats:
    """Counters for tests and metrics."""

    hits: int = 0
    misses: int = 0
    bypasses: int = 0
    loads: int = 0
    loads_by_family: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Fetched:
    """Payloads in lookup order (None where the row does not exist) and the overall outcome."""

    payloads: list[bytes | None]
    outcome: Outcome


class CacheEngine:
    """Cache-aside reads over a RedisStore, with tiered and jittered TTLs and negative caching."""

    def __init__(
        self,
        store: RedisStore,
        *,
        load_timeout_s: float,
        negative_ttl_s: int,
        jitter_pct: float,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.stats = EngineStats()
        self._load_timeout_s = load_timeout_s
        self._negative_ttl_ms = negative_ttl_s * 1000
        self._jitter = jitter_pct / 100
        self._rng = rng or random.Random()

    async def fetch(self, lookups: Sequence[tuple[Family, str]]) -> Fetched:
        """Answer every (family, id) with one MGET; load the misses with one query per family."""
        keys = [family.key(item_id) for family, item_id in lookups]
        try:
            raw_values = await self.store.mget(keys)
        except CacheUnavailable:
            self.stats.bypasses += 1
            loaded = await self._load_grouped(lookups)
            return Fetched([loaded[family].get(item_id) for family, item_id in lookups], Outcome.BYPASS)

        payloads: list[bytes | None] = []
        missing: list[int] = []
        for index, raw in enumerate(raw_values):
            entry = envelope.unpack(raw) if raw is not None else None
            if entry is None:
                missing.append(index)
                payloads.append(None)
            else:
                payloads.append(entry.payload)
        if not missing:
            self.stats.hits += 1
            return Fetched(payloads, Outcome.HIT)

        self.stats.misses += 1
        missing_lookups = [lookups[index] for index in missing]
        started = time.monotonic()
        loaded = await self._load_grouped(missing_lookups)
        load_ms = int((time.monotonic() - started) * 1000)
        for index, (family, item_id) in zip(missing, missing_lookups, strict=True):
            payloads[index] = loaded[family].get(item_id)
        await self._fill_quietly(self._fills(missing_lookups, loaded, load_ms))
        return Fetched(payloads, Outcome.MISS)

    async def put(self, family: Family, payloads: Mapping[str, bytes], *, load_ms: int = 0) -> int:
        """Write already loaded payloads (warming); returns how many. Raises CacheUnavailable."""
        fills = self._fills([(family, item_id) for item_id in payloads], {family: payloads}, load_ms)
        await self.store.fill(fills)
        return len(fills)

    async def invalidate(self, keys: Sequence[str], tags: Sequence[str]) -> int:
        """Delete keys and every key in the tags, atomically. Raises CacheUnavailable if Redis is down."""
        return await self.store.invalidate(keys, tags)

    async def _load_grouped(self, lookups: Sequence[tuple[Family, str]]) -> dict[Family, Mapping[str, bytes]]:
        ids_by_family: dict[Family, list[str]] = {}
        for family, item_id in lookups:
            ids = ids_by_family.setdefault(family, [])
            if item_id not in ids:
                ids.append(item_id)
        families = list(ids_by_family)
        results = await asyncio.gather(*(self._load(family, ids_by_family[family]) for family in families))
        return dict(zip(families, results, strict=True))

    async def _load(self, family: Family, ids: Sequence[str]) -> Mapping[str, bytes]:
        self.stats.loads += 1
        self.stats.loads_by_family[family.name] = self.stats.loads_by_family.get(family.name, 0) + 1
        try:
            async with asyncio.timeout(self._load_timeout_s):
                return await family.load(ids)
        except TimeoutError as exc:
            raise LoadTimeout(family.name, self._load_timeout_s) from exc

    def _fills(
        self,
        lookups: Sequence[tuple[Family, str]],
        loaded: Mapping[Family, Mapping[str, bytes]],
        load_ms: int,
    ) -> list[Fill]:
        now_ms = int(time.time() * 1000)
        fills: dict[str, Fill] = {}
        for family, item_id in lookups:
            payload = loaded[family].get(item_id)
            if payload is None and not self._negative_ttl_ms:
                continue
            ttl_ms = family.ttl_s * 1000 if payload is not None else self._negative_ttl_ms
            key = family.key(item_id)
            fills[key] = Fill(
                key,
                envelope.pack(payload, load_ms=load_ms, written_at_ms=now_ms),
                self._jittered(ttl_ms),
                family.tags,
            )
        return list(fills.values())

    def _jittered(self, ttl_ms: int) -> int:
        spread = ttl_ms * self._jitter
        return max(1, round(ttl_ms + self._rng.uniform(-spread, spread)))

    async def _fill_quietly(self, fills: Sequence[Fill]) -> None:
        # A failed fill costs only a future miss; the store has already logged and counted it.
        with contextlib.suppress(CacheUnavailable):
            await self.store.fill(fills)
