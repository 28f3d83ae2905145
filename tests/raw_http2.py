"""A gRPC call over raw HTTP/2, for metadata no gRPC client would send (non-ASCII, control bytes).

grpcio validates metadata before it leaves the client, so a test of what the server does with
arbitrary header bytes has to write the frames itself. h2 encodes them without validating.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events

_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RawAnswer:
    """What the server answered: the grpc-status (None if the stream was reset) and its message."""

    status: int | None
    message: str
    headers: dict[bytes, bytes]


async def raw_unary_call(
    port: int, path: str, request: bytes, metadata: Sequence[tuple[bytes, bytes]]
) -> RawAnswer:
    """One unary call to 127.0.0.1:port with exactly these extra headers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    config = h2.config.H2Configuration(
        client_side=True,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
    )
    connection = h2.connection.H2Connection(config)
    connection.initiate_connection()
    stream = connection.get_next_available_stream_id()
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", b"127.0.0.1"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        *metadata,
    ]
    connection.send_headers(stream, headers)
    connection.send_data(stream, b"\x00" + struct.pack(">I", len(request)) + request, end_stream=True)
    writer.write(connection.data_to_send())
    received: dict[bytes, bytes] = {}
    reset = False
    try:
        async with asyncio.timeout(_TIMEOUT_S):
            while not (b"grpc-status" in received or reset):
                data = await reader.read(65536)
                if not data:
                    break
                for event in connection.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                        received.update(dict(event.headers))
                    elif isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
                        reset = True
                    elif isinstance(event, h2.events.DataReceived):
                        connection.acknowledge_received_data(event.flow_controlled_length, stream)
                writer.write(connection.data_to_send())
    finally:
        writer.close()
    status = received.get(b"grpc-status")
    return RawAnswer(
        int(status) if status is not None else None,
        received.get(b"grpc-message", b"").decode(errors="replace"),
        received,
    )
