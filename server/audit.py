"""The consistency audit: now and then, compare a few cached entries with the database.

Facebook audits its invalidation pipeline this way: sample what the cache holds, reload it from the
source of truth, and count the differences. Samples come from the keys this process read lately (a
bounded ring the read path appends to), so no KEYS, SCAN or RANDOMKEY touches the keyspace, and another
tenant's keys never show up.

A difference is normal for as long as invalidation takes to arrive, so a suspect is looked at again
after a grace period (CACHEASIDE_AUDIT_GRACE_MS, above the invalidation bound) and counts only if it
still differs. A divergent key is then re-checked every pass until it is right again, which gives its
age: at least since the pass that first saw it. A single fill can stay wrong at most one TTL, so a
divergence older than the longest TTL means wrong values are being written again and again (a stale
set, an invalidation lost for good): a bug, counted on its own.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from server.cache import Family, RedisStore, envelope
from server.cache.types import Loader

_LOGGER = logging.getLogger(__name__)
RECENT_READS_KEPT = 1024  # reads remembered for sampling; each holds a reference, not a copy
MAX_TRACKED = 1000  # divergent keys re-checked every pass; more are counted but not aged

Lookup = tuple[Family, str]


class RecentReads:
    """The lookups of the last reads, for the audit to sample: one O(1) append per read."""

    def __init__(self, size: int = RECENT_READS_KEPT) -> None:
        self._reads: deque[Sequence[Lookup]] = deque(maxlen=size)
        self.note = self._reads.append  # the read path's whole cost: it appends its own sequence

    def sample(self, count: int, rng: random.Random) -> dict[str, Lookup]:
        """Up to count distinct lookups, by key: a random one of each of randomly chosen reads."""
        reads = list(self._reads)
        rng.shuffle(reads)
        chosen: dict[str, Lookup] = {}
        for lookups in reads:
            family, item_id = lookups[rng.randrange(len(lookups))]
            chosen.setdefault(family.key(item_id), (family, item_id))
            if len(chosen) >= count:
                break
        return chosen


@dataclass(slots=True)
class AuditStats:
    """What the audit found so far; the metrics read it on scrape."""

    passes: int = 0
    sampled: int = 0  # fresh cached entries compared with the database
    divergent: int = 0  # of those, entries that still differed after the grace period
    past_ttl: int = 0  # divergent keys seen to outlive the longest TTL: each is a bug
    oldest_divergence_s: float = 0.0  # the oldest divergence still present, at least this old


@dataclass(frozen=True, slots=True)
class _Look:
    entry: envelope.Envelope
    stored: bytes | None  # what the database holds now; None: no such row

    @property
    def differs(self) -> bool:
        return self.entry.payload != self.stored


@dataclass(slots=True)
class _Tracked:
    lookup: Lookup
    first_seen_s: float
    past_ttl: bool = False


class ConsistencyAuditor:
    """Samples cached entries of recent reads and compares them with what the family loaders return."""

    def __init__(
        self,
        store: RedisStore,
        recent: RecentReads,
        loaders: Mapping[str, Loader],
        *,
        samples: int,
        grace_s: float,
        longest_ttl_s: float,
        load_timeout_s: float,
    ) -> None:
        self.stats = AuditStats()
        # Replaceable for deterministic tests: wall-clock seconds, the grace wait, the sampling draws.
        self.clock: Callable[[], float] = time.time
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self.rng = random.Random()
        self._store = store
        self._recent = recent
        self._loaders = loaders
        self._samples = samples
        self._grace_s = grace_s
        self._longest_ttl_s = longest_ttl_s
        self._load_timeout_s = load_timeout_s
        self._tracked: dict[str, _Tracked] = {}

    async def run_every(self, interval_s: float) -> None:
        """Audit on an interval until cancelled; a pass that cannot reach Redis or the database is skipped."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.run_once()
            except Exception as exc:  # the audit must never take the server down
                _LOGGER.warning("consistency audit pass skipped: %s", exc)

    async def run_once(self) -> list[str]:
        """One pass: sample, compare, re-check suspects after the grace period. Returns the divergent keys."""
        candidates = {key: tracked.lookup for key, tracked in self._tracked.items()}
        for key, lookup in self._recent.sample(self._samples, self.rng).items():
            candidates.setdefault(key, lookup)
        first = await self._look(candidates)
        suspects = {key: candidates[key] for key, look in first.items() if look.differs}
        if suspects and self._grace_s > 0:
            await self.sleep(self._grace_s)
            again = await self._look(suspects)  # invalidated or refilled right since: not divergent
            suspects = {
                key: lookup for key, lookup in suspects.items() if key in again and again[key].differs
            }
        now = self.clock()
        self.stats.passes += 1
        self.stats.sampled += len(first)
        self.stats.divergent += len(suspects)
        for key in candidates.keys() - suspects.keys():
            self._tracked.pop(key, None)  # right again, or no longer cached
        for key, lookup in suspects.items():
            tracked = self._tracked.get(key)
            if tracked is None and len(self._tracked) < MAX_TRACKED:
                tracked = self._tracked[key] = _Tracked(lookup, first_seen_s=now)
            self._report(key, lookup, first[key], now, tracked)
        ages = [now - tracked.first_seen_s for tracked in self._tracked.values()]
        self.stats.oldest_divergence_s = max(ages, default=0.0)
        return list(suspects)

    async def _look(self, lookups: Mapping[str, Lookup]) -> dict[str, _Look]:
        # Fresh entries of the current generation only: an expired or superseded one is never served
        # as a hit, so it cannot be a divergence a caller sees.
        if not lookups:
            return {}
        keys = list(lookups)
        generation, raws = await self._store.mget(keys)
        now_ms = int(self.clock() * 1000)
        cached: dict[str, envelope.Envelope] = {}
        for key, raw in zip(keys, raws, strict=True):
            entry = envelope.unpack(raw) if raw is not None else None
            if entry is not None and entry.generation == generation and entry.is_fresh(now_ms):
                cached[key] = entry
        by_family: dict[str, dict[str, str]] = {}  # family name -> id -> key
        for key in cached:
            family, item_id = lookups[key]
            if family.name in self._loaders:
                by_family.setdefault(family.name, {})[item_id] = key
        looks: dict[str, _Look] = {}
        async with asyncio.timeout(self._load_timeout_s):
            for name, ids in by_family.items():
                stored = await self._loaders[name](list(ids))
                for item_id, key in ids.items():
                    looks[key] = _Look(cached[key], stored.get(item_id))
        return looks

    def _report(self, key: str, lookup: Lookup, look: _Look, now: float, tracked: _Tracked | None) -> None:
        family = lookup[0]
        divergent_for_s = now - tracked.first_seen_s if tracked is not None else 0.0
        # The entry was written about one TTL before it expires (give or take the jitter); the
        # divergence cannot be older than that fill, so this is its upper bound.
        entry_age_s = now - (look.entry.expires_at_ms / 1000 - family.ttl_s)
        fields = {
            "key": key,
            "family": family.name,
            "divergent_for_s": round(divergent_for_s, 3),
            "entry_age_s": round(entry_age_s, 3),
            "expires_in_s": round(look.entry.expires_at_ms / 1000 - now, 3),
            "cached_row": look.entry.payload is not None,
            "database_row": look.stored is not None,
        }
        if tracked is not None and not tracked.past_ttl and divergent_for_s > self._longest_ttl_s:
            tracked.past_ttl = True
            self.stats.past_ttl += 1
            _LOGGER.error(
                "cached %s has differed from the database for %.0f s, longer than the longest TTL "
                "(%.0f s): wrong values are being written again, a bug",
                key,
                divergent_for_s,
                self._longest_ttl_s,
                extra=fields,
            )
            return
        _LOGGER.warning("cached %s differs from the database", key, extra=fields)


def loaders_by_family(families: Sequence[Family]) -> dict[str, Loader]:
    """The audit's loaders, by family name."""
    return {family.name: family.load for family in families}
