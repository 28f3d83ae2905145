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
from typing import Generic, TypeVar

from server.cache.envelope import Envelope

_T = TypeVar("_T")


@dataclass(slots=True)
class NearStats:
    """Counters for tests and metrics."""

    hits: int = 0  # lookups answered from the entries (fetch_near)
    answered: int = 0  # reads answered whole (Answers): hits too, counted apart
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
    ) -> None:
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self.clock = clock
        self._entries: OrderedDict[str, tuple[Envelope, tuple[str, ...], float]] = OrderedDict()
        self.version = 0  # moves on every drop or flush
        self.stats = NearStats()
        self.max_answer_bytes = answer_bytes
        self.answer_bytes = 0  # held by every Answers of this cache together
        self._answers: list[Answers[object]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now_ms: int) -> Envelope | None:
        """The entry for key if it is here and fresh."""
        found = self.get_all((key,), now_ms)
        return found[0] if found else None

    def get_all(self, keys: Sequence[str], now_ms: int) -> list[Envelope] | None:
        """Every key's entry if all are here and fresh, else None (dropping the one found stale)."""
        found = self.get_all_until(keys, now_ms)
        return found[0] if found is not None else None

    def get_all_until(self, keys: Sequence[str], now_ms: int) -> tuple[list[Envelope], float] | None:
        """Every key's entry if all are here and fresh, and the `clock` time the first of them stops
        being served (its near-cache TTL or its freshness, whichever ends first); else None."""
        entries, monotonic_now, found = self._entries, self.clock(), []
        until = monotonic_now + self._ttl_s
        for key in keys:
            held = entries.get(key)
            if held is None:
                return None
            entry, _, deadline = held
            if deadline <= monotonic_now or not entry.is_fresh(now_ms):
                del entries[key]
                return None
            entries.move_to_end(key)
            found.append(entry)
            until = min(until, deadline, monotonic_now + (entry.expires_at_ms - now_ms) / 1000)
        return found, until

    def answers(self) -> Answers[_T]:
        """A new store of whole answers, kept coherent with this cache (one per kind of request)."""
        answers: Answers[_T] = Answers(self)
        self._answers.append(answers)  # type: ignore[arg-type]  # only cleared through this list
        return answers

    def _clear_answers(self) -> None:
        if self.answer_bytes:
            for answers in self._answers:
                answers.clear()

    def admit(self, key: str, entry: Envelope, tags: tuple[str, ...], *, read_at_version: int) -> None:
        """Keep an entry read from Redis, unless something was dropped since that read began."""
        if read_at_version != self.version:
            return
        if key in self._entries:
            self._clear_answers()  # an answer may hold the entry this one replaces
        self._entries[key] = (entry, tags, self.clock() + self._ttl_s)
        self._entries.move_to_end(key)
        self.stats.admitted += 1
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
            self.stats.evicted += 1

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

    For one kind of request (request bytes mean nothing without their type). Each answer carries the
    `clock` time its entries stop being served (NearCache.get_all_until, shortened by the caller for
    anything else that ends them early) and a detail the caller needs again on every hit. The cache
    clears every answer whenever it drops, flushes or replaces an entry; and all of a cache's answers
    together hold at most its `max_answer_bytes` of responses, the oldest leaving first.
    """

    def __init__(self, cache: NearCache) -> None:
        self._cache = cache
        self._clock = cache.clock
        self._stats = cache.stats
        self._held: dict[bytes, tuple[float, bytes, _T]] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._held)

    def get(self, request: bytes) -> tuple[float, bytes, _T] | None:
        """(until, response, detail) for request, if an answer is held and its entries would still be
        served; counted as a near-cache hit (the caller serves it). The held tuple itself: no copy."""
        held = self._held.get(request)
        if held is None or held[0] <= self._clock():
            return None
        self._stats.answered += 1
        return held

    def put(self, request: bytes, response: bytes, detail: _T, *, until: float) -> None:
        """Hold response as the answer to request until `until` (the caller read its entries just now)."""
        cache = self._cache
        size = len(request) + len(response)
        if size > cache.max_answer_bytes or until <= self._clock():
            return
        held = self._held
        previous = held.pop(request, None)
        if previous is not None:
            self._forget(request, previous[1])
        while cache.answer_bytes + size > cache.max_answer_bytes and held:
            oldest = next(iter(held))
            self._forget(oldest, held.pop(oldest)[1])
        if cache.answer_bytes + size > cache.max_answer_bytes:
            cache._clear_answers()  # the other kinds of request hold the budget: start over
        held[request] = (until, response, detail)
        self._bytes += size
        cache.answer_bytes += size

    def _forget(self, request: bytes, response: bytes) -> None:
        size = len(request) + len(response)
        self._bytes -= size
        self._cache.answer_bytes -= size

    def clear(self) -> None:
        """Forget every answer."""
        self._held.clear()
        self._cache.answer_bytes -= self._bytes
        self._bytes = 0
