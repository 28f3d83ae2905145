"""The cache-aside engine: read through Redis, resolve misses under leases, refresh early, serve stale.

It knows nothing of users or posts. Callers describe each key family (how ids become keys, which TTL,
which tags, how to load missing ids in one query) and ask for lookups; the engine answers with the
stored payload bytes, ready to go to the wire, and (past the near cache, whose answers are all hits)
how the answer was obtained.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import secrets
import time
from collections.abc import Callable, Sequence
from typing import TypeAlias, TypeVar

from server.cache import envelope
from server.cache.flights import BYPASS, LeaseFlights, Result
from server.cache.loading import Loading, Lookup, TtlPolicy
from server.cache.near import Answers, NearCache
from server.cache.notify import NEW_GENERATION, EventListener, FillNotifier
from server.cache.scripts import WEAK_LEASE_PREFIX
from server.cache.store import CacheUnavailable, LeaseKind, LeaseRequest, RedisStore
from server.cache.types import EngineHooks, EngineStats, Family, Fetched, Outcome, Resolved, combine

_LOGGER = logging.getLogger(__name__)


# Time to expiry, in units of load time x beta, past which XFetch would refresh with odds under exp(-30).
_XFETCH_FAR = 30
_T = TypeVar("_T")


NearFound: TypeAlias = "tuple[list[bytes | None], float, float, list[str]]"
"""What fetch_near found: the payloads, until when they may be served again without asking (on the
near cache's clock, and on the engine's wall clock in seconds), and their keys. A plain tuple: this is
the hit path of every read not answered whole, and a named tuple's constructor is a Python call."""


class CacheEngine:
    """Cache-aside reads with leases, single-flight, XFetch early refresh, negative and stale caching."""

    def __init__(
        self,
        store: RedisStore,
        *,
        notifier: FillNotifier | None = None,
        near: NearCache | None = None,
        load_timeout_s: float,
        leases: bool = True,
        lease_ttl_ms: int = 3000,
        negative_ttl_s: int = 5,
        max_stale_s: int = 0,
        jitter_pct: float = 0.0,
        error_backoff_ms: int = 1000,
        max_concurrent_loads: int = 0,
        load_queue_ms: int = 0,
        max_waiting_misses: int = 0,
    ) -> None:
        self.store = store
        self.notifier = notifier
        self.stats = EngineStats()
        self.hooks = EngineHooks()
        # Replaceable for deterministic tests: wall-clock seconds, and a uniform draw in [0, 1).
        self._clock: Callable[[], float] = time.time
        self.random: Callable[[], float] = random.random
        self.leases = leases
        self._loading = Loading(
            self.stats,
            self.hooks,
            timeout_s=load_timeout_s,
            max_concurrent=max_concurrent_loads,
            queue_s=load_queue_ms / 1000,
        )
        self._ttl = TtlPolicy(
            negative_ttl_ms=negative_ttl_s * 1000, max_stale_ms=max_stale_s * 1000, jitter=jitter_pct / 100
        )
        self._flights = LeaseFlights(
            store,
            notifier,
            self._loading,
            self._ttl,
            self.stats,
            lease_ms=lease_ttl_ms,
            error_backoff_ms=error_backoff_ms,
            now_ms=self._now_ms,
            max_waiting=max_waiting_misses,
        )
        self._lease_ms = lease_ttl_ms
        self._refreshing: set[str] = set()
        # The near cache needs the events to stay coherent: without a notifier there is none.
        self.near = near if notifier is not None else None
        if self.near is not None and notifier is not None:
            notifier.listen(EventListener(on_event=self._on_event, on_missed=self.near.flush))

    @property
    def clock(self) -> Callable[[], float]:
        """Wall-clock seconds, as TTLs are judged; replaceable for deterministic tests."""
        return self._clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        if self.near is not None:
            self.near.set_wall_clock(clock)  # held answers end on the same clock

    def _on_event(self, kind: str, key: str) -> None:
        if self.near is None:
            return
        if kind == NEW_GENERATION:
            self.near.flush()
        else:
            self.near.drop([key])

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    @property
    def waiting_misses(self) -> int:
        """Calls of this process waiting on database loads right now (bounded by max_waiting_misses)."""
        return self._flights.waiting

    def fetch_near(self, pairs: Sequence[tuple[Family, str]]) -> NearFound | None:
        """Every (family, id)'s payload from the near cache, with no I/O; None if any is missing there.

        A partial answer would still need the MGET, so it is all or nothing, and all of it is a hit.
        With the payloads, until when they may be served again without asking, on the near cache's
        clock (their near TTL and freshness, NearCache.get_all_until) and on this engine's (their
        freshness, and the start of XFetch's early-refresh window: from there each read must draw),
        and their keys: an answer built from them may be held that long (`answers`).
        """
        near = self._coherent_near()
        if near is None:
            return None
        now_ms = self._now_ms()
        keys = [family.key(item_id) for family, item_id in pairs]
        found = near.get_all_until(keys, now_ms)
        if found is None:
            return None
        entries, until = found
        self.stats.hits += 1
        near.stats.hits += 1
        payloads: list[bytes | None] = []
        wall_until_ms = math.inf
        for (family, item_id), entry in zip(pairs, entries, strict=True):
            payloads.append(entry.payload)
            quiet_ms: float = entry.expires_at_ms
            if family.xfetch_beta > 0:
                # Until then XFetch's odds are below exp(-30): no draw (see _xfetch_due).
                quiet_ms -= entry.load_ms * family.xfetch_beta * _XFETCH_FAR
            wall_until_ms = min(wall_until_ms, quiet_ms)
            if self._xfetch_due(family, entry, now_ms):
                self._refresh_early(Lookup(family, item_id, keys[len(payloads) - 1]), entry.generation)
        until = min(until, near.clock() + (wall_until_ms - now_ms) / 1000)
        return payloads, until, wall_until_ms / 1000, keys

    def answers(self) -> Answers[_T] | None:
        """A store of whole answers kept coherent with the near cache (None without one): a read that
        built its response from `fetch_near` may hold it there, and serve it from there again, until
        the time fetch_near gave. Its hits count as the near cache's."""
        if self.near is None or self.near.max_answer_bytes <= 0:
            return None
        return self.near.answers()

    def _coherent_near(self) -> NearCache | None:
        # Only while the events that keep it coherent arrive.
        if self.near is not None and self.notifier and self.notifier.connected.is_set():
            return self.near
        return None

    async def fetch_shared(self, pairs: Sequence[tuple[Family, str]]) -> Fetched:
        """Answer every (family, id) past the near cache: one MGET, then leases and a query per family.

        For the keys fetch_near did not answer all of; fills the near cache on the way.
        """
        lookups = [Lookup(family, item_id, family.key(item_id)) for family, item_id in pairs]
        near = self._coherent_near()
        near_version = near.version if near is not None else 0
        try:
            generation, raws = await self.store.mget([lookup.key for lookup in lookups])
        except CacheUnavailable:
            return await self._bypass(lookups)
        now_ms = self._now_ms()
        payloads: list[bytes | None] = [None] * len(lookups)
        misses: dict[str, Lookup] = {}
        stale: dict[str, bytes] = {}
        pending: list[int] = []
        for index, (lookup, raw) in enumerate(zip(lookups, raws, strict=True)):
            entry = envelope.unpack(raw) if raw is not None else None
            if entry is not None and entry.generation != generation:
                entry = None  # written before an invalidate-everything: as good as deleted
            if entry is not None and entry.is_fresh(now_ms):
                payloads[index] = entry.payload
                if near is not None:
                    near.admit(lookup.key, entry, lookup.family.tags, read_at_version=near_version)
                if self.leases and self._xfetch_due(lookup.family, entry, now_ms):
                    self._refresh_early(lookup, generation)
                continue
            misses.setdefault(lookup.key, lookup)
            if entry is not None and raw is not None:
                stale[lookup.key] = raw
            pending.append(index)
        if not misses:
            self.stats.hits += 1
            return Fetched(payloads, Outcome.HIT)

        misses_list = list(misses.values())
        results = await (
            self._flights.resolve(misses_list, generation)
            if self.leases
            else self._plain(misses_list, generation)
        )
        answers = await self._answers(results, stale)
        for index in pending:
            payloads[index] = answers[lookups[index].key].payload
        outcomes = [answer.outcome for answer in answers.values()]
        if len(pending) < len(lookups):
            outcomes.append(Outcome.HIT)
        outcome = combine(outcomes)
        if outcome is Outcome.STALE:
            self.stats.stale += 1
        elif outcome is Outcome.BYPASS:
            self.stats.bypasses += 1
        else:
            self.stats.misses += 1
        return Fetched(payloads, outcome)

    async def _answers(self, results: dict[str, Result], stale: dict[str, bytes]) -> dict[str, Resolved]:
        # Stale-if-error: a key whose load failed answers with the expired copy read before, but only
        # if that copy is still what Redis holds, so an invalidation since then is never undone.
        failed = {key: result for key, result in results.items() if not isinstance(result, Resolved)}
        unchanged: set[str] = set()
        candidates = [key for key in failed if key in stale and isinstance(failed[key], Exception)]
        if candidates:
            with contextlib.suppress(CacheUnavailable):
                _, current = await self.store.mget(candidates)
                unchanged = {key for key, raw in zip(candidates, current, strict=True) if raw == stale[key]}
        answers: dict[str, Resolved] = {}
        for key, result in results.items():
            if isinstance(result, Resolved):
                answers[key] = result
            elif key in unchanged:
                entry = envelope.unpack(stale[key])
                answers[key] = Resolved(entry.payload if entry else None, Outcome.STALE)
            else:
                raise result
        return answers

    async def refresh(self, family: Family, ids: Sequence[str], *, wait_for_slot: bool = False) -> int:
        """Reload ids and write them under fresh leases (warming); returns how many were written.

        Keys whose lease another caller holds are left to that caller's fill. Raises CacheUnavailable,
        and DatabaseSaturated when every load slot is taken, unless wait_for_slot says to wait for one.
        """
        lookups = [Lookup(family, item_id, family.key(item_id)) for item_id in ids]
        if wait_for_slot:
            # Before taking leases: live readers of these keys must not wait on a lease while we queue.
            await self._loading.slots.wait_for_room(1)
        generation = await self.store.generation()
        if not self.leases:
            results = await self._plain(lookups, generation, wait_for_slot=wait_for_slot)
            return sum(1 for result in results.values() if not isinstance(result, BaseException))
        # Weak leases: a live miss of one of these keys takes the lease over rather than wait for us.
        tokens = {lookup.key: WEAK_LEASE_PREFIX + secrets.token_hex(8) for lookup in lookups}
        requests = [LeaseRequest(lk.key, tokens[lk.key], family.tags, force=True) for lk in lookups]
        leases = await self.store.lease(
            requests, lease_ms=self._lease_ms, now_ms=self._now_ms(), generation=generation
        )
        granted = [lk for lk, lease in zip(lookups, leases, strict=True) if lease.kind is LeaseKind.GRANTED]
        _, written = await self._flights.load_and_fill(
            granted, tokens, generation, wait_for_slot=wait_for_slot
        )
        return written

    async def invalidate(self, keys: Sequence[str], tags: Sequence[str]) -> int:
        """Delete keys, their leases, and every key in the tags, atomically. Raises CacheUnavailable."""
        if self.near is not None:
            self.near.drop(keys, tags)  # before: a read racing the script must not re-admit the old value
        deleted = await self.store.invalidate(keys, tags)
        # Other processes drop their flights and near entries when the script's events reach them;
        # this one at once.
        self._flights.forget(keys, tags)
        if self.near is not None:
            self.near.drop(keys, tags)
        return deleted

    async def invalidate_everything(self) -> int:
        """Bump the namespace generation: every entry is invalid at once, O(1). Returns the new one."""
        generation = await self.store.bump_generation()
        if self.near is not None:
            self.near.flush()
        return generation

    async def drain(self) -> None:
        """Wait for background loads and early refreshes under way to finish."""
        await self._flights.drain()

    async def close(self, grace_s: float = 0.0) -> None:
        """Let background loads finish for up to grace_s, then stop them (releasing their leases)."""
        await self._flights.close(grace_s)

    def _xfetch_due(self, family: Family, entry: envelope.Envelope, now_ms: int) -> bool:
        # XFetch (Vattani et al., VLDB 2015): refresh early with a probability that rises towards
        # expiry and with the cost of a recompute, so one reader refreshes before the herd arrives.
        if family.xfetch_beta <= 0:
            return False
        scale = entry.load_ms * family.xfetch_beta
        if entry.expires_at_ms - now_ms > scale * _XFETCH_FAR:
            return False  # the chance is below exp(-30), 1e-13: no draw, no log on most hits
        gap = -scale * math.log(1.0 - self.random())
        return now_ms + gap >= entry.expires_at_ms

    def _refresh_early(self, lookup: Lookup, generation: int) -> None:
        if lookup.key in self._refreshing or self._flights.in_flight(lookup.key, generation):
            return
        self._refreshing.add(lookup.key)
        self._flights.spawn(self._refresh_one(lookup))

    async def _refresh_one(self, lookup: Lookup) -> None:
        try:
            if await self.refresh(lookup.family, [lookup.item_id]):
                self.stats.early_refreshes += 1
        except Exception as exc:  # the current value is still served; the next reader may retry
            _LOGGER.debug("early refresh of %s failed: %r", lookup.key, exc)
        finally:
            self._refreshing.discard(lookup.key)

    async def _plain(
        self, lookups: Sequence[Lookup], generation: int, *, wait_for_slot: bool = False
    ) -> dict[str, Result]:
        # Leases off: the seed's plain cache-aside, every miss loads. The benchmarks' baseline.
        try:
            loaded, load_ms = await self._loading.load(lookups, wait_for_slot=wait_for_slot)
        except Exception as exc:
            return {lookup.key: exc for lookup in lookups}
        now_ms = self._now_ms()
        answers: dict[str, Result] = {}
        fills = []
        for lookup in lookups:
            payload = loaded[lookup.family].get(lookup.item_id)
            answers[lookup.key] = Resolved(payload, Outcome.MISS)
            fill = self._ttl.fill(
                lookup, payload, generation=generation, load_ms=max(load_ms, 1), now_ms=now_ms, token=""
            )
            if fill is not None:
                fills.append(fill)
        with contextlib.suppress(CacheUnavailable):  # a failed fill costs only a future miss
            await self.store.fill(fills)
        return answers

    async def _bypass(self, lookups: Sequence[Lookup]) -> Fetched:
        self.stats.bypasses += 1
        if self.leases:  # Redis is down, but one process still sends one load per key
            unique = list({lookup.key: lookup for lookup in lookups}.values())
            results = await self._flights.resolve(unique, BYPASS)
            answers = {key: _raise_failure(result) for key, result in results.items()}
            return Fetched([answers[lookup.key].payload for lookup in lookups], Outcome.BYPASS)
        loaded, _ = await self._loading.load(lookups)
        return Fetched([loaded[lk.family].get(lk.item_id) for lk in lookups], Outcome.BYPASS)


def _raise_failure(result: Result) -> Resolved:
    if isinstance(result, Resolved):
        return result
    raise result
