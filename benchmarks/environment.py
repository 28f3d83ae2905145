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

from server import db
from server.config import Settings
from server.embedded_redis import EmbeddedRedis
from server.migrate import upgrade
from server.seed import SeedCounts, seed

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


def bench_settings(database_url: str, schema: str, redis_url: str, **overrides: Any) -> Settings:
    """Settings for a benchmark's service: its own key prefix, a free port, no warming at start."""
    return Settings(
        **{
            "database_url": database_url,
            "database_schema": schema,
            "redis_url": redis_url,
            "listen": "127.0.0.1:0",
            "key_prefix": f"bench-{uuid.uuid4().hex[:8]}",
            "warm_on_start": False,
            **overrides,
        }
    )


async def seed_database(settings: Settings, counts: SeedCounts) -> None:
    """Fill the benchmark's database with the demo rows."""
    engine = db.create_engine(settings)
    try:
        await seed(engine, counts, progress=False)
    finally:
        await engine.dispose()
