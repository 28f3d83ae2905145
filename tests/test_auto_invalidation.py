"""Automatic invalidation on PostgreSQL: a write by anyone, through plain SQL, reaches the cache.

Writes go through another connection with no service call. The bound we state and check: every key
the map names is gone, and the next read is fresh, within FRESH_WITHIN_S of the commit (typically a
few milliseconds: see the lag figures in the README).
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from prometheus_client import generate_latest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

import server.migrations
from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server.config import Settings
from server.domain.invalidation import INVALIDATION_MAP
from tests.conftest import Database, Running, start_service, stop_service
from tests.data import BASE_TIME, add_comment, add_post, add_user
from tests.helpers import call

FRESH_WITHIN_S = 0.5
RECONNECT_WITHIN_S = 3.0


@pytest.fixture
async def auto(
    database: Database, settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> AsyncIterator[Running]:
    """A service with automatic invalidation, over a small population."""
    if database.kind != "postgresql":
        pytest.skip("automatic invalidation reads PostgreSQL's outbox; on SQLite writers call Invalidate")
    await add_user(db_engine, "alice")
    await add_user(db_engine, "bob")
    await add_user(db_engine, "carol", full=False)
    await add_post(db_engine, "p1", "alice", title="first", views=10)
    await add_post(db_engine, "p2", "bob", title="second", views=5)
    await add_post(db_engine, "p3", "bob", published=False, archived=True, archived_at=BASE_TIME)
    await add_comment(db_engine, "c1", "p1", "bob")
    running = await start_service(settings, auto_invalidate=True, outbox_poll_ms=1000)
    assert running.app.invalidator is not None
    async with asyncio.timeout(10):
        await running.app.invalidator.caught_up.wait()  # the backlog of earlier writes is replayed
    yield running
    await stop_service(running)


@dataclass
class Case:
    """A write to one table: what is read (and cached) first, the SQL, the keys it must clear, the check."""

    name: str
    reads: list[tuple[str, Any]]
    sql: str
    cleared: set[str]
    fresh: Callable[[Running], Any] = field(default=lambda running: None)


async def _read(running: Running, rpc: str, request: Any) -> Any:
    try:
        response, _ = await call(getattr(running.stub, rpc), request)
        return response
    except grpc.aio.AioRpcError as error:
        return error.code()


def _full(user_id: str) -> tuple[str, Any]:
    return ("GetUser", pb.GetUserRequest(user_id=user_id, view=pb.USER_VIEW_FULL))


CASES = [
    Case(
        "users UPDATE",
        [_full("alice"), ("ListPostsByAuthor", pb.ListPostsByAuthorRequest(author_id="alice"))],
        "UPDATE users SET name = 'Alice Two' WHERE id = 'alice'",
        {"user:alice", "user_profile:alice", "user_settings:alice", "posts:author:alice"},
        lambda r: _read(r, *_full("alice")),
    ),
    Case(
        "users INSERT",
        [("GetUser", pb.GetUserRequest(user_id="dave"))],  # caches NOT_FOUND
        "INSERT INTO users (id, name, email, created_at) VALUES ('dave', 'Dave', 'd@x', now())",
        {"user:dave"},
        lambda r: _read(r, "GetUser", pb.GetUserRequest(user_id="dave")),
    ),
    Case(
        "users DELETE",
        [("GetUser", pb.GetUserRequest(user_id="carol"))],
        "DELETE FROM users WHERE id = 'carol'",
        {"user:carol"},
        lambda r: _read(r, "GetUser", pb.GetUserRequest(user_id="carol")),
    ),
    Case(
        "profiles UPDATE",
        [_full("alice")],
        "UPDATE profiles SET bio = 'rewritten' WHERE user_id = 'alice'",
        {"user_profile:alice"},
        lambda r: _read(r, *_full("alice")),
    ),
    Case(
        "profiles INSERT",
        [_full("carol")],
        "INSERT INTO profiles (user_id, bio, avatar_url) VALUES ('carol', 'hello', '')",
        {"user_profile:carol"},
        lambda r: _read(r, *_full("carol")),
    ),
    Case(
        "profiles DELETE",
        [_full("bob")],
        "DELETE FROM profiles WHERE user_id = 'bob'",
        {"user_profile:bob"},
        lambda r: _read(r, *_full("bob")),
    ),
    Case(
        "user_settings UPDATE",
        [_full("alice")],
        "UPDATE user_settings SET theme = 'solarized' WHERE user_id = 'alice'",
        {"user_settings:alice"},
        lambda r: _read(r, *_full("alice")),
    ),
    Case(
        "posts UPDATE",
        [
            ("GetPost", pb.GetPostRequest(post_id="p2")),
            ("GetTrending", pb.GetTrendingRequest()),
            ("GetArchived", pb.GetArchivedRequest()),
            ("ListPostsByAuthor", pb.ListPostsByAuthorRequest(author_id="bob")),
        ],
        "UPDATE posts SET title = 'second, edited', views = 1000 WHERE id = 'p2'",
        {"post:p2", "posts:trending", "posts:archived", "posts:author:bob"},
        lambda r: _read(r, "GetTrending", pb.GetTrendingRequest()),
    ),
    Case(
        "posts INSERT",
        [
            ("GetTrending", pb.GetTrendingRequest()),
            ("ListPostsByAuthor", pb.ListPostsByAuthorRequest(author_id="carol")),
        ],
        "INSERT INTO posts (id, author_id, title, body, published, views, archived, created_at) "
        "VALUES ('p9', 'carol', 'newest', '', true, 5000, false, now())",
        {"posts:trending", "posts:author:carol"},
        lambda r: _read(r, "ListPostsByAuthor", pb.ListPostsByAuthorRequest(author_id="carol")),
    ),
    Case(
        "posts DELETE",
        [
            ("GetPost", pb.GetPostRequest(post_id="p1")),
            ("GetTrending", pb.GetTrendingRequest()),
            ("ListPostsByAuthor", pb.ListPostsByAuthorRequest(author_id="alice")),
        ],
        "DELETE FROM posts WHERE id = 'p1'",
        {"post:p1", "posts:author:alice", "posts:trending"},
        lambda r: _read(r, "GetPost", pb.GetPostRequest(post_id="p1")),
    ),
    Case(
        "comments INSERT",
        [("ListCommentsByAuthor", pb.ListCommentsByAuthorRequest(author_id="alice"))],
        "INSERT INTO comments (id, post_id, author_id, body, created_at) "
        "VALUES ('c9', 'p2', 'alice', 'hi', now())",
        {"comments:author:alice"},
        lambda r: _read(r, "ListCommentsByAuthor", pb.ListCommentsByAuthorRequest(author_id="alice")),
    ),
    Case(
        "comments UPDATE",
        [("ListCommentsByAuthor", pb.ListCommentsByAuthorRequest(author_id="bob"))],
        "UPDATE comments SET body = 'edited' WHERE id = 'c1'",
        {"comments:author:bob"},
        lambda r: _read(r, "ListCommentsByAuthor", pb.ListCommentsByAuthorRequest(author_id="bob")),
    ),
    Case(
        "comments DELETE",
        [("ListCommentsByAuthor", pb.ListCommentsByAuthorRequest(author_id="bob"))],
        "DELETE FROM comments WHERE id = 'c1'",
        {"comments:author:bob"},
        lambda r: _read(r, "ListCommentsByAuthor", pb.ListCommentsByAuthorRequest(author_id="bob")),
    ),
]

EXPECTED = {
    "users UPDATE": lambda res: res.user.name == "Alice Two",
    "users INSERT": lambda res: res.user.id == "dave",
    "users DELETE": lambda res: res == grpc.StatusCode.NOT_FOUND,
    "profiles UPDATE": lambda res: res.user.profile.bio == "rewritten",
    "profiles INSERT": lambda res: res.user.profile.bio == "hello",
    "profiles DELETE": lambda res: not res.user.HasField("profile"),
    "user_settings UPDATE": lambda res: res.user.settings.theme == "solarized",
    "posts UPDATE": lambda res: res.posts[0].title == "second, edited",
    "posts INSERT": lambda res: [p.id for p in res.posts] == ["p9"],
    "posts DELETE": lambda res: res == grpc.StatusCode.NOT_FOUND,
    "comments INSERT": lambda res: [c.id for c in res.comments] == ["c9"],
    "comments UPDATE": lambda res: res.comments[0].body == "edited",
    "comments DELETE": lambda res: list(res.comments) == [],
}


async def _present(redis_client: aioredis.Redis, prefix: str, keys: set[str]) -> set[str]:
    found = await redis_client.mget([prefix + key for key in sorted(keys)])
    return {key for key, value in zip(sorted(keys), found, strict=True) if value is not None}


async def _wait_cleared(redis_client: aioredis.Redis, prefix: str, keys: set[str], within_s: float) -> float:
    started = time.monotonic()
    async with asyncio.timeout(within_s):
        while await _present(redis_client, prefix, keys):  # noqa: ASYNC110  (watching another process's work)
            await asyncio.sleep(0.005)
    return time.monotonic() - started


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_a_plain_sql_write_is_invalidated_within_the_bound(
    auto: Running, db_engine: AsyncEngine, redis_client: aioredis.Redis, case: Case
) -> None:
    for rpc, request in case.reads:
        await _read(auto, rpc, request)
    assert await _present(redis_client, auto.prefix, case.cleared) == case.cleared, "first, all are cached"
    async with db_engine.begin() as connection:
        await connection.execute(text(case.sql))
    elapsed = await _wait_cleared(redis_client, auto.prefix, case.cleared, FRESH_WITHIN_S)
    assert elapsed <= FRESH_WITHIN_S
    assert EXPECTED[case.name](await case.fresh(auto)), case.name


async def test_a_post_moved_between_authors_refreshes_both_lists(
    auto: Running, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> None:
    for author in ("alice", "bob"):
        await _read(auto, "ListPostsByAuthor", pb.ListPostsByAuthorRequest(author_id=author))
    async with db_engine.begin() as connection:
        await connection.execute(text("UPDATE posts SET author_id = 'bob' WHERE id = 'p1'"))
    await _wait_cleared(redis_client, auto.prefix, {"posts:author:alice", "posts:author:bob"}, FRESH_WITHIN_S)
    alice = await _read(auto, "ListPostsByAuthor", pb.ListPostsByAuthorRequest(author_id="alice"))
    bob = await _read(auto, "ListPostsByAuthor", pb.ListPostsByAuthorRequest(author_id="bob"))
    assert [p.id for p in alice.posts] == []
    assert "p1" in [p.id for p in bob.posts]


async def test_a_killed_listener_reconnects_and_no_stale_read_survives(
    auto: Running, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> None:
    invalidator = auto.app.invalidator
    assert invalidator is not None
    await _read(auto, "GetPost", pb.GetPostRequest(post_id="p1"))
    async with db_engine.begin() as connection:
        killed = await connection.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :name"),
            {"name": f"cacheaside-invalidator:{auto.app.settings.database_schema}"},
        )
        assert killed.scalar_one() is True
        await connection.execute(text("UPDATE posts SET title = 'while disconnected' WHERE id = 'p1'"))
    await _wait_cleared(redis_client, auto.prefix, {"post:p1"}, RECONNECT_WITHIN_S)
    response = await _read(auto, "GetPost", pb.GetPostRequest(post_id="p1"))
    assert response.post.title == "while disconnected"
    assert invalidator.stats.connects >= 2, "it reconnected"


async def test_changes_made_while_no_service_listens_are_replayed_at_start(
    auto: Running, settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> None:
    await _read(auto, "GetPost", pb.GetPostRequest(post_id="p2"))
    await stop_service(auto)
    async with db_engine.begin() as connection:
        await connection.execute(text("UPDATE posts SET title = 'while down' WHERE id = 'p2'"))
    assert await _present(redis_client, auto.prefix, {"post:p2"}), "nobody has invalidated it yet"
    restarted = await start_service(settings, auto_invalidate=True)
    try:
        await _wait_cleared(redis_client, auto.prefix, {"post:p2"}, RECONNECT_WITHIN_S)
        response = await _read(restarted, "GetPost", pb.GetPostRequest(post_id="p2"))
        assert response.post.title == "while down"
    finally:
        await stop_service(restarted)
    auto.app = restarted.app  # the fixture stops what runs now; stopping twice is harmless


async def test_the_lag_from_commit_to_invalidation_is_measured(auto: Running, db_engine: AsyncEngine) -> None:
    invalidator = auto.app.invalidator
    assert invalidator is not None
    before = invalidator.stats.changes
    async with db_engine.begin() as connection:
        await connection.execute(text("UPDATE posts SET views = views + 1 WHERE id = 'p1'"))
    async with asyncio.timeout(FRESH_WITHIN_S * 4):
        while invalidator.stats.changes == before:  # noqa: ASYNC110  (a counter another task moves)
            await asyncio.sleep(0.005)
    lag = invalidator.stats.lag_percentile_ms(99)
    assert lag is not None
    assert 0 <= lag < FRESH_WITHIN_S * 1000
    scraped = generate_latest(auto.app.metrics.registry).decode()
    assert f'cacheaside_invalidation_lag_ms{{quantile="0.99"}} {lag}' in scraped, "the lag is a metric"
    assert "cacheaside_outbox_connected 1.0" in scraped


def test_the_triggers_record_every_column_the_map_reads() -> None:
    path = Path(server.migrations.__file__).parent / "versions" / "0002_outbox.py"
    spec = importlib.util.spec_from_file_location("outbox_migration", path)
    assert spec is not None
    assert spec.loader is not None
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    for table, rule in INVALIDATION_MAP.items():
        read = {column for _, column in rule.keys}
        assert read <= set(migration.TRACKED_COLUMNS[table]), table
