"""Servers in their own processes, for what only a process shows: signals, workers, an installed wheel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.config import Settings

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def server_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that gives a `cacheaside serve` process these settings (plus extra)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CACHEASIDE_")}
    env.update(
        {
            "CACHEASIDE_DATABASE_URL": settings.database_url,
            "CACHEASIDE_DATABASE_SCHEMA": settings.database_schema,
            "CACHEASIDE_REDIS_URL": settings.redis_url,
            "CACHEASIDE_KEY_PREFIX": settings.key_prefix,
            "CACHEASIDE_WARM_ON_START": "false",
            "CACHEASIDE_LOG_FORMAT": "json",
            **extra,
        }
    )
    return env


async def spawn(
    *args: str, env: Mapping[str, str], executable: str = sys.executable
) -> asyncio.subprocess.Process:
    """`python -m client.cli ARGS` (or another interpreter's), stderr piped for its JSON logs."""
    return await asyncio.create_subprocess_exec(
        executable, "-m", "client.cli", *args, env=dict(env), stderr=asyncio.subprocess.PIPE
    )


async def log_lines_until(
    process: asyncio.subprocess.Process, wanted: str, count: int = 1
) -> list[dict[str, Any]]:
    """Read the JSON log lines on stderr until `count` of them have a message starting with `wanted`."""
    assert process.stderr is not None
    found: list[dict[str, Any]] = []
    seen: list[str] = []
    async with asyncio.timeout(START_TIMEOUT_S):
        while len(found) < count:
            raw = await process.stderr.readline()
            if not raw:
                raise AssertionError(f"process ended before logging {wanted!r}:\n" + "".join(seen))
            text = raw.decode()
            seen.append(text)
            try:
                line = json.loads(text)
            except ValueError:
                continue
            if str(line.get("msg", "")).startswith(wanted):
                found.append(line)
    return found


async def health_status(target: str, *, timeout_s: float = 2.0) -> int:
    """grpc.health.v1 Check on a fresh connection; raises AioRpcError if the call fails."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        return int(response.status)


async def terminate(process: asyncio.subprocess.Process) -> int:
    """SIGTERM, as an orchestrator stops a service; its exit code once it has stopped."""
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(STOP_TIMEOUT_S):
        return await process.wait()


@contextlib.asynccontextmanager
async def reaped(process: asyncio.subprocess.Process) -> AsyncIterator[asyncio.subprocess.Process]:
    """process, killed on the way out if a failed test left it running."""
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
