"""The near cache (L1): a bounded in-process cache of the hottest entries in front of Redis.

An entry lives for a short TTL at most, and no longer than its own freshness. It is kept coherent by
the cache events every process hears (notify.py): any change to its key drops it, a new generation
or a possible miss of events (a gap in their sequence, a lost connection) flushes everything, and
while events are not being heard at all it is not used. A read racing an invalidation could bring an
old value back after its drop, so an entry is admitted only if nothing was dropped since its read
began (`version`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from server.cache.envelope import Envelope


@dataclass(slots=True)
class NearStats:
    """Counters for tests and metrics."""

    hits: int = 0
    admitted: int = 0
    dropped: int = 0
    flushes: int = 0
    evicted: int = 0


class NearCache:
    """Key -> (entry, tags, monotonic deadline), least recently used first."""

    def __init__(
        self, *, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[Envelope, tuple[str, ...], float]] = OrderedDict()
        self.version = 0  # moves on every drop or flush
        self.stats = NearStats()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now_ms: int) -> Envelope | None:
        """The entry for key if it is here and fresh."""
        found = self.get_all((key,), now_ms)
        return found[0] if found else None

    def get_all(self, keys: Sequence[str], now_ms: int) -> list[Envelope] | None:
        """Every key's entry if all are here and fresh, else None (dropping the one found stale)."""
        entries, monotonic_now, found = self._entries, self._clock(), []
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
        return found

    def admit(self, key: str, entry: Envelope, tags: tuple[str, ...], *, read_at_version: int) -> None:
        """Keep an entry read from Redis, unless something was dropped since that read began."""
        if read_at_version != self.version:
            return
        self._entries[key] = (entry, tags, self._clock() + self._ttl_s)
        self._entries.move_to_end(key)
        self.stats.admitted += 1
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
            self.stats.evicted += 1

    def drop(self, keys: Iterable[str], tags: Iterable[str] = ()) -> None:
        """Forget keys, and every entry that belongs to one of tags."""
        self.version += 1
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
        self._entries.clear()
        self.stats.flushes += 1
