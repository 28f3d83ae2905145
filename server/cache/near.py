"""The near cache (L1): a bounded in-process cache of the hottest entries in front of Redis.

An entry lives for a short TTL at most, and no longer than its own freshness. It is kept coherent by
the cache events every process hears (notify.py): any change to its key drops it, a new generation
or a possible miss of events (a gap in their sequence, a lost connection) flushes everything, and
while events are not being heard at all it is not used. A read racing an invalidation could bring an
old value back after its drop, so an entry is admitted only if nothing was dropped since its read
began (`version`).

Above the entries, `Answers` keeps whole responses built from them, by request bytes: a repeated read
then costs one dictionary lookup instead of its parse, plan, lookups and framing. Every drop, flush or
replacement of an entry clears every answer, and an answer lives no longer than the entries it was
built from would have been served, so it is never staler than they are.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from server.cache.envelope import Envelope

_T = TypeVar("_T")


@dataclass(slots=True)
class NearStats:
    """Counters for tests and metrics."""

    hits: int = 0  # reads answered from the entries (CacheEngine.fetch_near)
    answered: int = 0  # reads answered whole (Answers): near-cache hits too, counted apart
    admitted: int = 0
    dropped: int = 0
    flushes: int = 0
    evicted: int = 0


class NearCache:
    """Key -> (entry, tags, monotonic deadline), least recently used first."""

    def __init__(
        self,
        *,
        max_entries: int,
        ttl_s: float,
        answer_bytes: int = 0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_entries = max_entries
        self._ttl_s = ttl_s
        self.clock = clock
        self._entries: OrderedDict[str, tuple[Envelope, tuple[str, ...], float]] = OrderedDict()
        self.version = 0  # moves on every drop or flush
        self.stats = NearStats()
        self.max_answer_bytes = answer_bytes
        self.answer_bytes = 0  # held by every Answers of this cache together, overhead included
        self._answers: list[Answers[Any]] = []
        self._answered_keys: set[str] = set()  # the keys of the entries held answers were built from
        self._wall_clock = wall_clock

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now_ms: int) -> Envelope | None:
        """The entry for key if it is here and fresh."""
        found = self.get_all_until((key,), now_ms)
        return found[0][0] if found is not None else None

    def get_all_until(self, keys: Sequence[str], now_ms: int) -> tuple[list[Envelope], float] | None:
        """Every key's entry if all are here and fresh, and the `clock` time the first of them stops
        being served (its near-cache TTL or its freshness, whichever ends first); else None (dropping
        the one found stale)."""
        entries, monotonic_now, found = self._entries, self.clock(), []
        until = monotonic_now + self._ttl_s
        for key in keys:
            held = entries.get(key)
            if held is None:
                return None
            entry, _, deadline = held
            if deadline <= monotonic_now or not entry.is_fresh(now_ms):
                del entries[key]
                if key in self._answered_keys:
                    self._clear_answers()  # by the two clocks' reckoning, its answers have ended too
                return None
            entries.move_to_end(key)
            found.append(entry)
            until = min(until, deadline, monotonic_now + (entry.expires_at_ms - now_ms) / 1000)
        return found, until

    def answers(self) -> Answers[_T]:
        """A new store of whole answers, kept coherent with this cache (one per kind of request)."""
        answers: Answers[_T] = Answers(self, self._wall_clock)
        self._answers.append(answers)
        return answers

    def set_wall_clock(self, wall_clock: Callable[[], float]) -> None:
        """The wall clock (seconds) that answers' freshness is judged on: the cache engine's own."""
        self._wall_clock = wall_clock
        for answers in self._answers:
            answers.wall_clock = wall_clock

    def _clear_answers(self) -> None:
        if self.answer_bytes:  # never 0 while an answer is held: each counts its overhead
            for answers in self._answers:
                answers.clear()
            self._answered_keys.clear()

    def _make_room(self, size: int, first: Answers[Any]) -> None:
        # The oldest answers leave first: those of the kind of request being held, then the others.
        for answers in (first, *self._answers):
            while self.answer_bytes + size > self.max_answer_bytes and answers.drop_oldest():
                pass

    def admit(self, key: str, entry: Envelope, tags: tuple[str, ...], *, read_at_version: int) -> None:
        """Keep an entry read from Redis, unless something was dropped since that read began."""
        if read_at_version != self.version:
            return
        if key in self._entries:
            self._clear_answers()  # an answer may hold the entry this one replaces
        self._entries[key] = (entry, tags, self.clock() + self._ttl_s)
        self._entries.move_to_end(key)
        self.stats.admitted += 1
        if len(self._entries) > self.max_entries:
            evicted, _ = self._entries.popitem(last=False)
            self.stats.evicted += 1
            if evicted in self._answered_keys:
                self._clear_answers()  # read again later, it may hold a newer value than its answers

    def drop(self, keys: Iterable[str], tags: Iterable[str] = ()) -> None:
        """Forget keys, and every entry that belongs to one of tags."""
        self.version += 1
        self._clear_answers()
        for key in keys:
            if self._entries.pop(key, None) is not None:
                self.stats.dropped += 1
        tags = set(tags)
        if tags:
            for key in [k for k, (_, own, _) in self._entries.items() if tags.intersection(own)]:
                del self._entries[key]
                self.stats.dropped += 1

    def flush(self) -> None:
        """Forget everything."""
        self.version += 1
        self._clear_answers()
        self._entries.clear()
        self.stats.flushes += 1


class Answers(Generic[_T]):
    """Whole responses built from a near cache's entries, by the request bytes that asked for them.

    For one kind of request (request bytes mean nothing without their type). Each answer holds until
    its entries would stop being served by either clock: the near cache's (their near TTL) and the
    wall clock their freshness and XFetch's early-refresh window are judged on (the caller computes
    both when it reads the entries, NearCache.get_all_until and CacheEngine.fetch_near). The cache
    clears every answer whenever it drops, flushes, replaces or evicts an entry an answer was built
    from, or finds one stale; and all of a cache's answers together hold at most its
    `max_answer_bytes`, overhead included, the oldest leaving first. A request is held the second
    time it is offered within the cache's `max_entries` other requests, so one-off requests (a batch
    of ids drawn at random) never push out the answers asked for again. Answers are held only from
    entries read while cache events are heard, and losing the events flushes the cache, so no
    answer outlives the coherence its entries had.
    """

    def __init__(self, cache: NearCache, wall_clock: Callable[[], float]) -> None:
        self._cache = cache
        self._clock = cache.clock
        self.wall_clock = wall_clock
        self._stats = cache.stats
        # request -> (until on the cache's clock, until on the wall clock, response, detail)
        self._held: dict[bytes, tuple[float, float, bytes, _T]] = {}
        self._bytes = 0
        self._seen: set[int] = set()  # hashes of the requests offered (put) and not held yet

    def __len__(self) -> int:
        return len(self._held)

    def get(self, request: bytes) -> tuple[float, float, bytes, _T] | None:
        """The held (until, wall until, response, detail) for request while its entries would still
        be served, counted as a near-cache hit (the caller serves it); else None."""
        held = self._held.get(request)
        if held is None:
            return None
        # Read as attributes first, then called: `self._clock()` would look the name up on the class
        # (a callable in the instance, not a method, so 3.11 cannot specialize it) in CPython's global
        # type-attribute cache, where these two names took the same slot and evicted each other on
        # every call: 3k instructions of a held answer's 358k (`make bench-instructions`).
        clock, wall_clock = self._clock, self.wall_clock
        if held[0] <= clock() or held[1] <= wall_clock():
            self._forget(request)
            return None
        self._stats.answered += 1
        return held

    def put(
        self,
        request: bytes,
        response: bytes,
        detail: _T,
        *,
        keys: Iterable[str],
        until: float,
        wall_until: float,
    ) -> None:
        """Hold response as the answer to request, built from the entries of keys just read, until
        `until` on the cache's clock and `wall_until` on the wall clock: if request was offered before
        (a one-off request, such as a batch of ids drawn at random, would only take room from the
        answers that are asked for again)."""
        cache = self._cache
        size = _ANSWER_OVERHEAD + len(request) + len(response)
        if size > cache.max_answer_bytes // _LARGEST_SHARE or until <= self._clock():
            return  # no single answer takes more than its share: it would push out all the others
        if request in self._held:
            self._forget(request)
        else:
            # Hashes, not the requests: a collision only holds an answer one offer early.
            offered, seen = hash(request), self._seen
            if offered not in seen:
                if len(seen) >= cache.max_entries:
                    seen.clear()  # a request must come back within that many others to be held
                seen.add(offered)
                return
        cache._make_room(size, self)
        self._held[request] = (until, wall_until, response, detail)
        self._bytes += size
        cache.answer_bytes += size
        cache._answered_keys.update(keys)

    def drop_oldest(self) -> bool:
        """Forget the oldest answer held; False if none is."""
        if not self._held:
            return False
        self._forget(next(iter(self._held)))
        return True

    def _forget(self, request: bytes) -> None:
        _, _, response, _ = self._held.pop(request)
        size = _ANSWER_OVERHEAD + len(request) + len(response)
        self._bytes -= size
        self._cache.answer_bytes -= size

    def clear(self) -> None:
        """Forget every answer."""
        self._held.clear()
        self._cache.answer_bytes -= self._bytes
        self._bytes = 0


# What an answer costs beyond its request and response bytes: its dictionary slot, its tuple, the two
# bytes objects' headers, the keys it adds to the cache's set (measured: about 400 bytes a GetPost).
_ANSWER_OVERHEAD = 320
_LARGEST_SHARE = 16  # no answer may take more than 1/16 of the budget
