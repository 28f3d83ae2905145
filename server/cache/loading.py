"""Loading from the database for the engine, and turning loaded payloads into cache fills."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from server.cache import envelope
from server.cache.store import Fill
from server.cache.types import DatabaseSaturated, EngineHooks, EngineStats, Family, LoadTimeout


@dataclass(frozen=True, slots=True)
class Lookup:
    """One (family, id) to answer, with its key."""

    family: Family
    item_id: str
    key: str


Loaded = dict[Family, Mapping[str, bytes]]


@dataclass(frozen=True, slots=True)
class TtlPolicy:
    """How long entries live: jittered tier TTLs, negative TTL, and the stale copy kept after."""

    negative_ttl_ms: int
    max_stale_ms: int
    jitter: float  # a fraction: 0.1 spreads every TTL by +-10%
    uniform: Callable[[float, float], float] = random.uniform

    def fill(
        self, lookup: Lookup, payload: bytes | None, *, generation: int, load_ms: int, now_ms: int, token: str
    ) -> Fill | None:
        """The fill for a loaded payload, or None when it should not be cached (negative caching off)."""
        if payload is None:
            if not self.negative_ttl_ms:
                return None
            fresh_ms, keep_ms = self._jittered(self.negative_ttl_ms), 0
        else:
            fresh_ms, keep_ms = self._jittered(lookup.family.ttl_s * 1000), self.max_stale_ms
        value = envelope.pack(
            payload, generation=generation, load_ms=load_ms, expires_at_ms=now_ms + fresh_ms
        )
        return Fill(lookup.key, value, fresh_ms + keep_ms, lookup.family.tags, token)

    def _jittered(self, ttl_ms: int) -> int:
        spread = ttl_ms * self.jitter
        return max(1, round(ttl_ms + self.uniform(-spread, spread)))


class LoadSlots:
    """At most `limit` database queries of loads at once in this process (0: no limit).

    A miss that finds no free slot waits a short, bounded time for one (`take_within`) and is then
    refused: a burst is absorbed, but queueing without end would only add to a database that is
    already saturated, and make every caller wait. Warming, which has its own concurrency bound, may
    wait as long as it takes (`wait_and_take`).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._waiters: list[asyncio.Future[None]] = []

    def _needed(self, queries: int) -> int:
        # A load needing more than the whole budget takes all of it, so it can still run alone.
        return min(queries, self.limit)

    def take(self, queries: int) -> int:
        """Take slots for a load of `queries` queries; raises DatabaseSaturated if they are not free."""
        need = self._needed(queries)
        if self.limit and self.in_use + need > self.limit:
            raise DatabaseSaturated(self.limit)
        self.in_use += need
        return need

    async def take_within(self, queries: int, wait_s: float) -> int:
        """Take slots, waiting at most wait_s for them; then DatabaseSaturated."""
        try:
            return self.take(queries)
        except DatabaseSaturated:
            if wait_s <= 0:
                raise
        try:
            async with asyncio.timeout(wait_s):
                await self.wait_for_room(queries)
        except TimeoutError:
            raise DatabaseSaturated(self.limit) from None
        return self.take(queries)

    async def wait_for_room(self, queries: int) -> None:
        """Wait until a load of `queries` queries would get its slots (without taking them)."""
        need = self._needed(queries)
        while self.limit and self.in_use + need > self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)

    async def wait_and_take(self, queries: int) -> int:
        """Take slots, waiting for them to come free."""
        await self.wait_for_room(queries)
        return self.take(queries)  # no await since the wait: the room is still there

    def give_back(self, taken: int) -> None:
        """Return slots taken by take or wait_and_take."""
        self.in_use -= taken
        for waiter in self._waiters:  # each re-checks; those that still do not fit wait again
            if not waiter.done():
                waiter.set_result(None)


class Loading:
    """Runs loaders with a timeout, one query per family, within the load slots, and counts them."""

    def __init__(
        self,
        stats: EngineStats,
        hooks: EngineHooks,
        *,
        timeout_s: float,
        max_concurrent: int = 0,
        queue_s: float = 0.0,
    ) -> None:
        self._stats = stats
        self._hooks = hooks
        self.timeout_s = timeout_s
        self.queue_s = queue_s
        self.slots = LoadSlots(max_concurrent)

    async def load(self, lookups: Sequence[Lookup], *, wait_for_slot: bool = False) -> tuple[Loaded, int]:
        """Load every lookup with one query per family, concurrently; also returns the load time in ms.

        Each query takes a load slot; without free slots this raises DatabaseSaturated before touching
        the database, unless wait_for_slot (warming) says to wait for them.
        """
        ids_by_family: dict[Family, dict[str, None]] = {}
        for lookup in lookups:
            ids_by_family.setdefault(lookup.family, {})[lookup.item_id] = None
        families = list(ids_by_family)
        if wait_for_slot:
            taken = await self.slots.wait_and_take(len(families))
        else:
            try:
                taken = await self.slots.take_within(len(families), self.queue_s)
            except DatabaseSaturated:
                self._stats.loads_refused += 1
                raise
        try:
            started = time.monotonic()
            try:
                results = await asyncio.gather(*(self._load(f, list(ids_by_family[f])) for f in families))
            except Exception:
                self._stats.load_failures += 1
                raise
            load_ms = int((time.monotonic() - started) * 1000)
            if self._hooks.after_load is not None:
                await self._hooks.after_load([lookup.key for lookup in lookups])
        finally:
            self.slots.give_back(taken)
        return dict(zip(families, results, strict=True)), load_ms

    async def _load(self, family: Family, ids: Sequence[str]) -> Mapping[str, bytes]:
        self._stats.loads += 1
        self._stats.loads_by_family[family.name] = self._stats.loads_by_family.get(family.name, 0) + 1
        try:
            async with asyncio.timeout(self.timeout_s):
                return await family.load(ids)
        except TimeoutError as exc:
            raise LoadTimeout(family.name, self.timeout_s) from exc
