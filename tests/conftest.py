"""Fixtures over real components: Redis, SQLite and PostgreSQL, and a grpc.aio server on a free port.

Each run gets its own Redis key prefix and its own PostgreSQL schema, so concurrent runs never see
each other's data; each test gets its own key prefix and empty tables.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from sqlalchemy import delete, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from client.proto.cacheaside.v1 import cache_service_pb2_grpc as pb_grpc
from server import db
from server.app import App, create_app
from server.config import Settings
from server.domain.keys import key_prefix
from server.domain.models import metadata
from server.embedded_redis import EmbeddedRedis
from server.migrate import upgrade_sync
from tests.private_postgres import private_postgres

RUN_ID = uuid.uuid4().hex[:8]
DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
_prefix_counter = itertools.count()


def _redis_answers(url: str) -> bool:
    async def ping() -> bool:
        client = aioredis.Redis.from_url(url, socket_connect_timeout=1)
        try:
            return bool(await client.ping())
        except Exception:
            return False
        finally:
            await client.aclose()

    return asyncio.run(ping())


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The machine's Redis if it answers, else a private redis-server for this run."""
    url = os.environ.get("CACHEASIDE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    if _redis_answers(url):
        yield url
        return
    with EmbeddedRedis() as private:
        yield private.url


def _postgres_answers(url: str) -> str | None:
    async def connect() -> str | None:
        engine = create_async_engine(url, connect_args={"timeout": 3})
        try:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
            return None
        except Exception as exc:
            return repr(exc)
        finally:
            await engine.dispose()

    return asyncio.run(connect())


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The machine's PostgreSQL if it answers, else a private one; under CI=true, never a skip."""
    url = os.environ.get("CACHEASIDE_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    problem = _postgres_answers(url)
    if not problem:
        yield url
        return
    try:
        with private_postgres() as private:
            yield private.url
            return
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        message = f"PostgreSQL at {url} is unreachable ({problem}) and a private one failed to start ({exc})"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@dataclass(frozen=True)
class Database:
    """A migrated database for this run: its URL and schema."""

    kind: str
    url: str
    schema: str = ""


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    """Each test that uses it runs once on SQLite and once on PostgreSQL, both migrated by Alembic."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "cacheaside.db"
        found = Database("sqlite", f"sqlite+aiosqlite:///{path}")
        upgrade_sync(Settings(database_url=found.url))
        yield found
        return
    url = request.getfixturevalue("postgres_url")
    found = Database("postgresql", url, f"cacheaside_test_{RUN_ID}")
    upgrade_sync(Settings(database_url=found.url, database_schema=found.schema))
    yield found
    asyncio.run(_drop_schema(url, found.schema))


async def _drop_schema(url: str, schema: str) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as connection:
        await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    await engine.dispose()


@pytest.fixture
def postgres_only(database: Database) -> None:
    """For tests that gate loads with a PostgreSQL table lock (tests.helpers.posts_locked)."""
    if database.kind != "postgresql":
        pytest.skip("the load gate is a PostgreSQL table lock")


@pytest.fixture
def settings(database: Database, redis_url: str) -> Settings:
    """Settings for one test: its own key prefix, a free port, no startup warming."""
    return Settings(
        database_url=database.url,
        database_schema=database.schema,
        redis_url=redis_url,
        key_prefix=f"test-{RUN_ID}-{next(_prefix_counter)}",
        listen="127.0.0.1:0",
        warm_on_start=False,
        auto_invalidate=False,  # tests of automatic invalidation turn it on
        # A busy machine can stall a healthy Redis past the 100 ms default; tests of Redis faults
        # set their own, short timeouts.
        redis_timeout_ms=1000,
        shutdown_grace_s=0,
    )


@pytest.fixture
async def db_engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """The test's database, emptied before the test."""
    engine = db.create_engine(settings)
    async with engine.begin() as connection:
        for table in reversed(metadata.sorted_tables):
            await connection.execute(delete(table))
    yield engine
    await engine.dispose()


@pytest.fixture
async def redis_client(settings: Settings, redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A direct Redis client, for looking behind the service; removes the test's keys afterwards."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    prefix = key_prefix(settings.key_prefix)
    async for key in client.scan_iter(match=prefix + "*", count=1000):
        await client.delete(key)
    await client.aclose()


@dataclass
class Running:
    """A started server and a stub connected to it."""

    app: App
    stub: pb_grpc.CacheServiceStub
    channel: grpc.aio.Channel
    prefix: str

    @property
    def target(self) -> str:
        """host:port of the server."""
        return f"127.0.0.1:{self.app.port}"


async def start_service(settings: Settings, **overrides: Any) -> Running:
    """Build and start a real server on a free port, with settings overrides."""
    if overrides:
        settings = settings.model_copy(update=overrides)
    app = create_app(settings)
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    return Running(app, pb_grpc.CacheServiceStub(channel), channel, key_prefix(settings.key_prefix))


async def stop_service(running: Running) -> None:
    """Close the channel and stop the server."""
    await running.channel.close()
    await running.app.stop(0)


@pytest.fixture
async def service(
    settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> AsyncIterator[Running]:
    """A running service over the test's database and Redis prefix."""
    running = await start_service(settings)
    yield running
    await stop_service(running)
