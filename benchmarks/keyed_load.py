"""A gRPC unary load generator whose request body changes on every call, for the miss and Zipf runs.

h2load sends one body over and over, which makes every call the same key. This sends a sequence of
bodies instead, one after another, at h2load's shape (connections x streams in flight each). It speaks
just enough HTTP/2 over cleartext (RFC 9113, prior knowledge): the request header block is encoded once
(HPACK literals, no table), frames are written as prepared bytes with the stream id filled in, and
responses are read at the frame level only, never decoding headers. So it costs a few microseconds
per call, far below a Python gRPC server's, and the suite checks that against the no-op server.

A call counts as answered when its stream carried a message (DATA) before the trailers, as failed
when it ended without one (a gRPC error) or was reset; req/s counts answered calls only. The gRPC
status itself is checked on the server's counters. Prints one JSON object on stdout.

    python -m benchmarks.keyed_load --target 127.0.0.1:50051 --bodies bodies.bin --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import cast

from benchmarks.stats import percentile

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_FRAME = struct.Struct(">I B I")  # the 9-byte header as (length << 8 | type), flags, stream id
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY, _WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
_END_STREAM, _ACK, _END_HEADERS = 0x1, 0x1, 0x4
_MAX_WINDOW = 2**31 - 1
_DEFAULT_WINDOW = 65_535


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I B I", (len(payload) << 8) | kind, flags, stream) + payload


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_string(text: str) -> bytes:
    raw = text.encode()
    return _hpack_int(len(raw), 7, 0) + raw


def header_block(authority: str, path: str) -> bytes:
    """The request's HPACK block: static-table names, literal values, nothing added to any table."""
    block = bytearray(b"\x83\x86")  # :method POST, :scheme http (static entries 3 and 6)
    for index, value in ((4, path), (1, authority), (31, "application/grpc")):  # :path :authority c-t
        block += _hpack_int(index, 4, 0x00) + _hpack_string(value)  # literal without indexing
    block += b"\x00" + _hpack_string("te") + _hpack_string("trailers")
    return bytes(block)


def grpc_message(body: bytes) -> bytes:
    """A gRPC length-prefixed message: uncompressed flag, big-endian length, bytes."""
    return b"\x00" + struct.pack(">I", len(body)) + body


def write_bodies(path: Path, bodies: Sequence[bytes]) -> None:
    """Store serialized requests for --bodies: each as a 4-byte length and the bytes."""
    path.write_bytes(b"".join(struct.pack(">I", len(body)) + body for body in bodies))


def read_bodies(path: Path) -> list[bytes]:
    """The serialized requests write_bodies stored."""
    data = path.read_bytes()
    bodies, position = [], 0
    while position < len(data):
        (size,) = struct.unpack_from(">I", data, position)
        bodies.append(data[position + 4 : position + 4 + size])
        position += 4 + size
    return bodies


class _Shared:
    """What all connections share: the next body, the deadline, the results."""

    def __init__(self, bodies: list[bytes], headers: bytes, deadline: float) -> None:
        self.messages = [grpc_message(body) for body in bodies]
        self.headers = headers
        self.deadline = deadline
        self.next = 0
        self.latencies_us: list[int] = []
        self.with_message = 0
        self.without_message = 0
        self.reset = 0

    def take(self) -> bytes:
        message = self.messages[self.next % len(self.messages)]
        self.next += 1
        return message


class _Connection(asyncio.Protocol):
    def __init__(self, shared: _Shared, streams: int, done: asyncio.Future[None]) -> None:
        self._shared = shared
        self._streams = streams
        self._done = done
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._started: dict[int, int] = {}  # stream id -> start, ns
        self._got_data: set[int] = set()
        self._next_stream = 1
        self._send_window = _DEFAULT_WINDOW
        self._received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        settings = struct.pack(">HI", 2, 0) + struct.pack(">HI", 4, _MAX_WINDOW)  # no push; big windows
        transport.write(
            _PREFACE
            + _frame(_SETTINGS, 0, 0, settings)
            + _frame(_WINDOW_UPDATE, 0, 0, struct.pack(">I", _MAX_WINDOW - _DEFAULT_WINDOW))
        )
        self._fill()

    def _fill(self) -> None:
        assert self._transport is not None
        if time.monotonic() >= self._shared.deadline:
            if not self._started and not self._done.done():
                self._done.set_result(None)
            return
        out = bytearray()
        while len(self._started) < self._streams:
            message = self._shared.take()
            if self._send_window < len(message):
                self._shared.next -= 1
                break
            stream = self._next_stream
            self._next_stream += 2
            out += _frame(_HEADERS, _END_HEADERS, stream, self._shared.headers)
            out += _frame(_DATA, _END_STREAM, stream, message)
            self._send_window -= len(message)
            self._started[stream] = time.monotonic_ns()
        if out:
            self._transport.write(bytes(out))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        position, end = 0, len(buffer)
        replies = bytearray()
        while end - position >= 9:
            word, flags, stream = _FRAME.unpack_from(buffer, position)
            length, kind = word >> 8, word & 0xFF
            if end - position - 9 < length:
                break
            body = position + 9
            position = body + length
            stream &= _MAX_WINDOW
            if kind == _DATA:
                self._received += length
                self._got_data.add(stream)
            elif kind == _HEADERS and flags & _END_STREAM:
                self._finish(stream, answered=stream in self._got_data)
            elif kind == _RST_STREAM:
                self._finish(stream, answered=False)
                self._shared.reset += 1
            elif kind == _SETTINGS and not flags & _ACK:
                replies += _frame(_SETTINGS, _ACK, 0, b"")
            elif kind == _PING and not flags & _ACK:
                replies += _frame(_PING, _ACK, 0, bytes(buffer[body:position]))
            elif kind == _WINDOW_UPDATE and stream == 0:
                self._send_window += struct.unpack_from(">I", buffer, body)[0] & _MAX_WINDOW
            elif kind == _GOAWAY and not self._done.done():
                self._done.set_exception(ConnectionError("the server sent GOAWAY"))
        del buffer[:position]
        if self._received > _MAX_WINDOW // 2:
            replies += _frame(_WINDOW_UPDATE, 0, 0, struct.pack(">I", self._received))
            self._received = 0
        if replies and self._transport is not None:
            self._transport.write(bytes(replies))
        self._fill()

    def _finish(self, stream: int, *, answered: bool) -> None:
        started = self._started.pop(stream, None)
        if started is None:
            return
        self._got_data.discard(stream)
        shared = self._shared
        shared.latencies_us.append((time.monotonic_ns() - started) // 1000)
        if answered:
            shared.with_message += 1
        else:
            shared.without_message += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_exception(exc or ConnectionError("the server closed the connection"))


async def run(
    host: str, port: int, path: str, bodies: list[bytes], *, connections: int, streams: int, duration_s: float
) -> dict[str, float]:
    """Keep connections x streams calls in flight for duration_s; counts and latency percentiles."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    shared = _Shared(bodies, header_block(f"{host}:{port}", path), started + duration_s)
    finished: list[asyncio.Future[None]] = []
    for _ in range(connections):
        finished.append(loop.create_future())
        await loop.create_connection(partial(_Connection, shared, streams, finished[-1]), host, port)
    await asyncio.wait_for(asyncio.gather(*finished), duration_s + 30)
    elapsed = time.monotonic() - started
    latencies = sorted(shared.latencies_us)
    count = len(latencies)
    answered = shared.with_message
    return {
        "calls": count,
        "requests": answered,  # answered with a message; refusals are not served calls
        "failed": shared.without_message + shared.reset,
        "seconds": elapsed,
        "req_per_s": answered / elapsed,
        "p50_ms": percentile(latencies, 50) / 1000,
        "p99_ms": percentile(latencies, 99) / 1000,
        "distinct_bodies_sent": min(shared.next, len(bodies)),
    }


def main(argv: list[str] | None = None) -> int:
    """Run one load and print its JSON result."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--target", required=True, help="host:port")
    parser.add_argument("--path", default="/cacheaside.v1.CacheService/GetPost")
    parser.add_argument("--bodies", type=Path, required=True, help="file written by write_bodies")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--streams", type=int, default=4, help="calls in flight per connection")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        result = runner.run(
            run(
                host,
                int(port),
                args.path,
                read_bodies(args.bodies),
                connections=args.connections,
                streams=args.streams,
                duration_s=args.duration,
            )
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
