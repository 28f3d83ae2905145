"""What the suite ran on: CPU, memory, kernel, load, and the versions of everything measured."""

from __future__ import annotations

import os
import platform
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import grpc
import redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def _h2load_version(binary: str) -> str:
    output = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return output.stdout.strip() or "unknown"


async def _database_version(url: str) -> str:
    if url.startswith("sqlite"):
        return f"SQLite {sqlite3.sqlite_version}"
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            version = str((await connection.execute(text("SHOW server_version"))).scalar_one())
        return f"PostgreSQL {version.split()[0]}"
    finally:
        await engine.dispose()


async def describe(*, redis_url: str, database_url: str, h2load: str) -> dict[str, Any]:
    """The machine and software versions, for the report's first lines."""
    client = redis.Redis.from_url(redis_url)
    try:
        redis_version = str(client.info("server")["redis_version"])
    finally:
        client.close()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(_memory_gib(), 1),
        "kernel": platform.release(),
        "load_average_at_start": [round(load, 2) for load in os.getloadavg()],
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "redis": f"Redis {redis_version}",
        "database": await _database_version(database_url),
        "load_generator": _h2load_version(h2load),
    }


def one_line(machine: dict[str, Any]) -> str:
    """The machine in one line."""
    load = f"load average {'/'.join(map(str, machine['load_average_at_start']))} at start"
    if "load_average_at_end" in machine:
        load += f", {'/'.join(map(str, machine['load_average_at_end']))} at end"
    return (
        f"{machine['cores']} x {machine['cpu']}, {machine['memory_gib']} GiB, Linux {machine['kernel']}, "
        f"{load}; Python {machine['python']}, grpcio {machine['grpcio']}, {machine['redis']}, "
        f"{machine['database']}, {machine['load_generator']}"
    )
