"""Where benchmarks get Redis and a database: the machine's if they answer, private ones otherwise."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from server.config import Settings
from server.embedded_redis import EmbeddedRedis
from server.migrate import upgrade

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


@contextlib.contextmanager
def bench_redis_url() -> Iterator[str]:
    """CACHEASIDE_BENCH_REDIS_URL, the machine's Redis, or a private redis-server."""
    url = os.environ.get("CACHEASIDE_BENCH_REDIS_URL", DEFAULT_REDIS_URL)
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError:
        with EmbeddedRedis() as private:
            yield private.url
        return
    yield url


@contextlib.asynccontextmanager
async def bench_database(scratch: str) -> AsyncIterator[tuple[str, str]]:
    """A migrated PostgreSQL schema of its own (dropped after), or a SQLite file if none answers."""
    url = os.environ.get("CACHEASIDE_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    engine = create_async_engine(url, connect_args={"timeout": 3})
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except Exception:
        await engine.dispose()
        sqlite_url = f"sqlite+aiosqlite:///{scratch}/bench.db"
        await upgrade(Settings(database_url=sqlite_url))
        yield sqlite_url, ""
        return
    schema = f"cacheaside_bench_{uuid.uuid4().hex[:8]}"
    try:
        await upgrade(Settings(database_url=url, database_schema=schema))
        yield url, schema
    finally:
        async with engine.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await engine.dispose()


def save_result(name: str, report: dict[str, Any]) -> None:
    """Write a benchmark's report to benchmarks/results/<name>.json."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
