"""A TCP proxy the tests control, to make a real database unreachable or slow without stopping it."""

from __future__ import annotations

import asyncio
import contextlib
from enum import StrEnum


class ProxyMode(StrEnum):
    """What the proxy does with connections."""

    FORWARD = "forward"  # pass bytes both ways
    REFUSE = "refuse"  # drop every connection at once: the database looks down
    BLACKHOLE = "blackhole"  # accept, then never answer: the database looks hung


class TcpProxy:
    """Listens on a free loopback port and forwards to an upstream host and port."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.mode = ProxyMode.FORWARD
        self.latency_s = 0.0  # added before each chunk is passed on, both ways
        self.sent_upstream = 0  # chunks passed from clients to the upstream: their round trips, or more
        self.port = 0

    async def start(self) -> TcpProxy:
        """Begin listening."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def set_mode(self, mode: ProxyMode) -> None:
        """Change behaviour; leaving FORWARD cuts every open connection."""
        self.mode = mode
        if mode is not ProxyMode.FORWARD:
            for writer in list(self._writers):
                writer.close()

    async def close(self) -> None:
        """Stop listening and cut every connection."""
        self.set_mode(ProxyMode.REFUSE)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            if self.mode is ProxyMode.REFUSE:
                return
            if self.mode is ProxyMode.BLACKHOLE:
                await reader.read()  # until the client gives up
                return
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
            self._writers.add(up_writer)
            try:
                await asyncio.gather(
                    _pipe(reader, up_writer, self, upstream=True),
                    _pipe(up_reader, writer, self, upstream=False),
                )
            finally:
                self._writers.discard(up_writer)
                up_writer.close()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proxy: TcpProxy, *, upstream: bool
) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            proxy.sent_upstream += upstream
            if proxy.latency_s:
                await asyncio.sleep(proxy.latency_s)
            writer.write(data)
            await writer.drain()
    writer.close()
