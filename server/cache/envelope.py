"""The bytes stored under each cache key: a fixed header, then the payload as it goes to the wire.

The header carries what later reads need without a second round trip: whether the key records a row
or its absence (negative caching), the namespace generation it was written in (invalidate-everything
bumps it, and entries of older generations are ignored), how long the load took (XFetch's delta), and
when the value stops being fresh. Redis keeps the key longer than that (max-stale), so a stale copy can
stand in while the database is down. The lease script reads the generation at bytes 2..5 and
expires_at_ms at bytes 10..17: keep the layout in step with scripts._HEADER.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_HEADER = struct.Struct(">BIIQ")  # kind, generation, load_ms, expires_at_ms
HEADER_SIZE = _HEADER.size

KIND_VALUE = 1
KIND_ABSENT = 2


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded cache entry; payload is None when the entry records that the row does not exist."""

    payload: bytes | None
    generation: int
    load_ms: int
    expires_at_ms: int

    def is_fresh(self, now_ms: int) -> bool:
        """Whether the entry is within its TTL (past it, it is only a stale copy)."""
        return now_ms < self.expires_at_ms


def pack(payload: bytes | None, *, generation: int, load_ms: int, expires_at_ms: int) -> bytes:
    """Encode a cache entry; payload None records a row that does not exist."""
    kind = KIND_ABSENT if payload is None else KIND_VALUE
    header = _HEADER.pack(kind, generation & 0xFFFFFFFF, min(max(load_ms, 0), 0xFFFFFFFF), expires_at_ms)
    return header if payload is None else header + payload


def unpack(raw: bytes) -> Envelope | None:
    """Decode a cache entry; None for bytes this version does not understand (treated as a miss)."""
    if len(raw) < HEADER_SIZE:
        return None
    kind, generation, load_ms, expires_at_ms = _HEADER.unpack_from(raw)
    if kind == KIND_VALUE:
        return Envelope(raw[HEADER_SIZE:], generation, load_ms, expires_at_ms)
    if kind == KIND_ABSENT:
        return Envelope(None, generation, load_ms, expires_at_ms)
    return None
