"""Loading from the database for the engine, and turning loaded payloads into cache fills."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from server.cache import envelope
from server.cache.store import Fill
from server.cache.types import EngineHooks, EngineStats, Family, LoadTimeout


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


class Loading:
    """Runs loaders with a timeout, one query per family, and counts them."""

    def __init__(self, stats: EngineStats, hooks: EngineHooks, *, timeout_s: float) -> None:
        self._stats = stats
        self._hooks = hooks
        self.timeout_s = timeout_s

    async def load(self, lookups: Sequence[Lookup]) -> tuple[Loaded, int]:
        """Load every lookup with one query per family, concurrently; also returns the load time in ms."""
        ids_by_family: dict[Family, dict[str, None]] = {}
        for lookup in lookups:
            ids_by_family.setdefault(lookup.family, {})[lookup.item_id] = None
        families = list(ids_by_family)
        started = time.monotonic()
        try:
            results = await asyncio.gather(*(self._load(f, list(ids_by_family[f])) for f in families))
        except Exception:
            self._stats.load_failures += 1
            raise
        load_ms = int((time.monotonic() - started) * 1000)
        if self._hooks.after_load is not None:
            await self._hooks.after_load([lookup.key for lookup in lookups])
        return dict(zip(families, results, strict=True)), load_ms

    async def _load(self, family: Family, ids: Sequence[str]) -> Mapping[str, bytes]:
        self._stats.loads += 1
        self._stats.loads_by_family[family.name] = self._stats.loads_by_family.get(family.name, 0) + 1
        try:
            async with asyncio.timeout(self.timeout_s):
                return await family.load(ids)
        except TimeoutError as exc:
            raise LoadTimeout(family.name, self.timeout_s) from exc
