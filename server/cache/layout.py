"""Where each cache key lives in Redis: one layout for a single Redis, one for Redis Cluster.

On Redis Cluster a script may only touch keys of one hash slot, so the layout puts together what one
script touches: a value and its lease share the value's hash tag (`{post:p1}`), the members of a tag
set share the tag's (`{tag:post_lists}posts:author:a`), and every group of keys a script changes
gets an event counter in its own slot. On a single Redis there are no braces and one counter.
"""

from __future__ import annotations

from binascii import crc_hqx
from collections.abc import Iterable
from functools import cache

CLUSTER_SLOTS = 16384
LEASE_SUFFIX = ":lease"


def slot_of(key: str) -> int:
    """The Redis Cluster hash slot of a key (its first non-empty {hash tag}, else all of it)."""
    data = key.encode()
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return crc_hqx(data, 0) % CLUSTER_SLOTS


@cache
def _slot_tags() -> tuple[str, ...]:
    # A short string for each slot, found once: a counter named with it lands in that slot.
    tags: dict[int, str] = {}
    number = 0
    while len(tags) < CLUSTER_SLOTS:
        text = format(number, "x")
        tags.setdefault(crc_hqx(text.encode(), 0) % CLUSTER_SLOTS, text)
        number += 1
    return tuple(tags[slot] for slot in range(CLUSTER_SLOTS))


class KeyLayout:
    """Maps the engine's keys (`post:p1`) to Redis keys and back."""

    def __init__(self, prefix: str, *, cluster: bool) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("a key prefix must not contain braces: they would become the hash tag")
        self.prefix = prefix
        self.cluster = cluster
        self._tags: list[tuple[str, str]] = []  # (key prefix, tag), longest key prefix first

    def register(self, key_prefix: str, tags: Iterable[str]) -> None:
        """Keys starting with key_prefix belong to the first of tags (and, on a cluster, to its slot)."""
        for tag in tags:
            self._tags.append((key_prefix, tag))
            self._tags.sort(key=lambda pair: -len(pair[0]))
            return

    def value(self, key: str) -> str:
        """The Redis key of a value."""
        if not self.cluster:
            return self.prefix + key
        tag = next((tag for start, tag in self._tags if key.startswith(start)), None)
        return f"{self.prefix}{{{key}}}" if tag is None else f"{self.prefix}{{{tag}}}{key}"

    def lease(self, key: str) -> str:
        """The Redis key of a value's lease: always in the value's slot."""
        return self.value(key) + LEASE_SUFFIX

    def tag(self, tag: str) -> str:
        """The Redis key of a tag set: on a cluster, in the slot of its members."""
        return f"{self.prefix}{{{tag}}}" if self.cluster else self.prefix + tag

    def generation(self) -> str:
        """The Redis key of the namespace generation."""
        return self.prefix + ("{generation}" if self.cluster else "generation")

    def counter(self, redis_key: str) -> str:
        """The event counter for a script that changes redis_key: in its slot on a cluster."""
        if not self.cluster:
            return self.prefix + "events:seq"
        return f"{self.prefix}{{{_slot_tags()[slot_of(redis_key)]}}}events:seq"

    def counters(self) -> list[str]:
        """Every event counter: one on a single Redis, one per slot on a cluster."""
        if not self.cluster:
            return [self.prefix + "events:seq"]
        return [f"{self.prefix}{{{tag}}}events:seq" for tag in _slot_tags()]

    def key_of(self, redis_key: str) -> str:
        """The engine's key for a Redis value key (events name Redis keys)."""
        rest = redis_key[len(self.prefix) :]
        if not self.cluster or not rest.startswith("{"):
            return rest
        tag, _, after = rest[1:].partition("}")
        return after or tag

    def slot(self, redis_key: str) -> int:
        """The slot scripts for redis_key run in (0 on a single Redis: one group)."""
        return slot_of(redis_key) if self.cluster else 0
