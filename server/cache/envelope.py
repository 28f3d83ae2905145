"""The bytes stored under each cache key: a fixed header, then the payload as it goes to the wire.

The header carries what later reads need without a second round trip: whether the key records a row
or the absence of one (negative caching), how long the load took, and when the value was written.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_HEADER = struct.Struct(">BIQ")  # kind, load_ms, written_at_ms
HEADER_SIZE = _HEADER.size

KIND_VALUE = 1
KIND_ABSENT = 2


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded cache entry; payload is None when the entry records that the row does not exist."""

    payload: bytes | None
    load_ms: int
    written_at_ms: int


def pack(payload: bytes | None, *, load_ms: int, written_at_ms: int) -> bytes:
    """Encode a cache entry; payload None records a row that does not exist."""
    kind = KIND_ABSENT if payload is None else KIND_VALUE
    header = _HEADER.pack(kind, min(load_ms, 0xFFFFFFFF), written_at_ms)
    return header if payload is None else header + payload


def unpack(raw: bytes) -> Envelope | None:
    """Decode a cache entry; None for bytes this version does not understand (treated as a miss)."""
    if len(raw) < HEADER_SIZE:
        return None
    kind, load_ms, written_at_ms = _HEADER.unpack_from(raw)
    if kind == KIND_VALUE:
        return Envelope(raw[HEADER_SIZE:], load_ms, written_at_ms)
    if kind == KIND_ABSENT:
        return Envelope(None, load_ms, written_at_ms)
    return None
