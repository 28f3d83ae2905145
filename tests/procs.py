"""Server processes for tests that need several instances sharing one Redis and one database.

Each child builds the real service with create_app, serves on a free port, and answers "stats"
(its engine counters) and "stop" on a pipe, so tests can count loads across processes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import signal
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from server.app import create_app
from server.collector import freeze_startup_heap
from server.config import Settings

_CONTEXT = multiprocessing.get_context("spawn")


def _child_main(settings: dict[str, Any], extra_load_ms: float, conn: Connection) -> None:
    # Daemonic, so it ends with the test; but the server in it starts a warm worker of its own.
    multiprocessing.current_process().daemon = False
    asyncio.run(_serve(Settings(**settings), extra_load_ms, conn))


async def _serve(settings: Settings, extra_load_ms: float, conn: Connection) -> None:
    app = create_app(settings)

    async def query_cost(_keys: Sequence[str]) -> None:
        await asyncio.sleep(extra_load_ms / 1000)

    if extra_load_ms:
        app.engine.hooks.after_load = query_cost
    await app.start()
    freeze_startup_heap()
    conn.send(app.port)
    loop = asyncio.get_running_loop()
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command == "stats":
            stats = dataclasses.asdict(app.engine.stats)
            if app.engine.near is not None:
                stats["near"] = dataclasses.asdict(app.engine.near.stats)
            conn.send(stats)
        elif command == "stop":
            break
    await app.stop(0)
    conn.send("stopped")


class ServerProcess:
    """A child process running the service."""

    def __init__(self, settings: Settings, *, extra_load_ms: float = 0) -> None:
        """Start the child; extra_load_ms makes every load cost that much more (benchmarks)."""
        self._conn, child_conn = _CONTEXT.Pipe()
        args = (settings.model_dump(), extra_load_ms, child_conn)
        self._process = _CONTEXT.Process(target=_child_main, args=args, daemon=True)
        self._process.start()
        if not self._conn.poll(60):
            raise RuntimeError("server process did not start")
        self.port: int = self._conn.recv()

    @property
    def pid(self) -> int:
        """The child's process id."""
        assert self._process.pid is not None
        return self._process.pid

    @property
    def target(self) -> str:
        """host:port of this server."""
        return f"127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        """The child's engine counters."""
        self._conn.send("stats")
        return dict(self._conn.recv())

    def kill(self) -> None:
        """SIGKILL: the process dies mid-whatever, as a crashed instance would."""
        if self._process.pid is not None:
            os.kill(self._process.pid, signal.SIGKILL)
        self._process.join(10)

    def stop(self) -> None:
        """Stop cleanly (or kill, if it is gone or stuck)."""
        if self._process.is_alive():
            try:
                self._conn.send("stop")
                if self._conn.poll(15):
                    self._conn.recv()
            except (BrokenPipeError, EOFError, OSError):
                pass
        self._process.join(10)
        if self._process.is_alive():
            self.kill()
