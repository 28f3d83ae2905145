"""Protobuf wire-format helpers, so cached bytes reach the wire without decode and re-encode.

A repeated or singular message field is a sequence of (tag, length, bytes) records, and concatenated
messages merge. So a response is built by framing cached payloads, and a list cached at full length is
cut to a caller's limit by walking the record headers, never by parsing the records.
"""

from __future__ import annotations

_WIRE_TYPE_LEN = 2


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Lengths of cached records are almost always under 16 KiB: their varints come from a table, once built.
_SHORT_VARINTS = [_encode_varint(value) for value in range(1 << 14)]


def _varint(value: int) -> bytes:
    return _SHORT_VARINTS[value] if value < 1 << 14 else _encode_varint(value)


def frame(field_number: int, payload: bytes) -> bytes:
    """The record for a length-delimited field (a message or bytes) holding payload."""
    return _varint((field_number << 3) | _WIRE_TYPE_LEN) + _varint(len(payload)) + payload


def frame_all(field_number: int, payloads: list[bytes]) -> bytes:
    """The records of a repeated message field, in order."""
    tag = _varint((field_number << 3) | _WIRE_TYPE_LEN)
    short = _SHORT_VARINTS
    parts: list[bytes] = []
    for payload in payloads:
        size = len(payload)
        parts += (tag, short[size] if size < 1 << 14 else _encode_varint(size), payload)
    return b"".join(parts)


def take_records(buffer: bytes, count: int) -> bytes:
    """The first count length-delimited records of buffer (all of them if it holds fewer)."""
    position = 0
    end = len(buffer)
    for _ in range(count):
        if position >= end:
            break
        position = _skip_varint(buffer, position)  # the tag
        length, position = _read_varint(buffer, position)
        position += length
    return buffer[:position]


def _skip_varint(buffer: bytes, position: int) -> int:
    while buffer[position] & 0x80:
        position += 1
    return position + 1


def _read_varint(buffer: bytes, position: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        byte = buffer[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
