"""Invalidate: stale until told, fresh right after, exactly the related keys, without KEYS or SCAN."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine

from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server.config import Settings
from server.embedded_redis import EmbeddedRedis
from tests.conftest import Running, start_service, stop_service
from tests.data import add_comment, add_post, add_user, set_post, set_profile, set_user
from tests.helpers import call, error_of


@dataclass
class Private:
    """A service on a Redis of its own, whose command statistics only this test moves."""

    running: Running
    admin: aioredis.Redis


@pytest.fixture
async def private(settings: Settings, db_engine: AsyncEngine) -> AsyncIterator[Private]:
    """A service on a private redis-server, and an admin connection to that server."""
    with EmbeddedRedis() as server:
        running = await start_service(settings, redis_url=server.url)
        admin = aioredis.Redis.from_url(server.url)
        try:
            yield Private(running, admin)
        finally:
            await admin.aclose()
            await stop_service(running)


async def _cached_keys(redis_client: aioredis.Redis, prefix: str) -> set[str]:
    # The event counter is bookkeeping, not a cached key; the first event creates it.
    keys = {key.decode()[len(prefix) :] async for key in redis_client.scan_iter(match=prefix + "*")}
    return keys - {"events:seq"}


async def test_a_post_changed_behind_the_cache_stays_cached_until_invalidated(
    service: Running, db_engine: AsyncEngine
) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice", title="v1", views=5)
    await call(service.stub.GetPost, pb.GetPostRequest(post_id="p1"))
    await call(service.stub.GetTrending, pb.GetTrendingRequest())

    await set_post(db_engine, "p1", title="v2", views=50)
    stale, meta = await call(service.stub.GetPost, pb.GetPostRequest(post_id="p1"))
    assert (stale.post.title, meta["x-cache"]) == ("v1", "hit")
    stale_list, _ = await call(service.stub.GetTrending, pb.GetTrendingRequest())
    assert stale_list.posts[0].views == 5

    await call(service.stub.Invalidate, pb.InvalidateRequest(post_ids=["p1"]))
    fresh, meta = await call(service.stub.GetPost, pb.GetPostRequest(post_id="p1"))
    assert (fresh.post.title, meta["x-cache"]) == ("v2", "miss")
    fresh_list, _ = await call(service.stub.GetTrending, pb.GetTrendingRequest())
    assert fresh_list.posts[0].views == 50


async def test_a_user_changed_behind_the_cache_is_fresh_in_every_view_after_invalidate(
    service: Running, db_engine: AsyncEngine
) -> None:
    await add_user(db_engine, "alice")
    full = pb.GetUserRequest(user_id="alice", view=pb.USER_VIEW_FULL)
    await call(service.stub.GetUser, full)
    await set_user(db_engine, "alice", name="Alice v2")
    await set_profile(db_engine, "alice", bio="new bio")
    stale, _ = await call(service.stub.GetUser, full)
    assert stale.user.name == "Name alice"

    await call(service.stub.Invalidate, pb.InvalidateRequest(user_ids=["alice"]))
    fresh, meta = await call(service.stub.GetUser, full)
    assert meta["x-cache"] == "miss"
    assert (fresh.user.name, fresh.user.profile.bio) == ("Alice v2", "new bio")


async def test_invalidate_removes_exactly_the_related_keys(
    service: Running, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> None:
    for user in ("alice", "bob"):
        await add_user(db_engine, user)
        await add_post(db_engine, f"{user}-post", user)
        await add_comment(db_engine, f"{user}-comment", f"{user}-post", user)
    stub = service.stub
    for user in ("alice", "bob"):
        await call(stub.GetUser, pb.GetUserRequest(user_id=user, view=pb.USER_VIEW_FULL))
        await call(stub.GetPost, pb.GetPostRequest(post_id=f"{user}-post"))
        await call(stub.ListPostsByAuthor, pb.ListPostsByAuthorRequest(author_id=user))
        await call(stub.ListCommentsByAuthor, pb.ListCommentsByAuthorRequest(author_id=user))
    await call(stub.GetTrending, pb.GetTrendingRequest())
    await call(stub.GetArchived, pb.GetArchivedRequest())
    everything = await _cached_keys(redis_client, service.prefix)

    user_keys = {
        "user:alice",
        "user_profile:alice",
        "user_settings:alice",
        "posts:author:alice",
        "comments:author:alice",
    }
    response, _ = await call(stub.Invalidate, pb.InvalidateRequest(user_ids=["alice"]))
    assert response.keys_invalidated == len(user_keys)
    assert await _cached_keys(redis_client, service.prefix) == everything - user_keys

    # A post: the post, and every cached post list (trending, archived, each author's list) via the tag.
    response, _ = await call(stub.Invalidate, pb.InvalidateRequest(post_ids=["bob-post"]))
    post_keys = {"post:bob-post", "posts:trending", "posts:archived", "posts:author:bob", "tag:post_lists"}
    assert response.keys_invalidated == len(post_keys) - 1  # the tag set itself is not a cached value
    remaining = await _cached_keys(redis_client, service.prefix)
    assert remaining == everything - user_keys - post_keys
    assert {"user:bob", "post:alice-post", "comments:author:bob"} <= remaining


async def test_post_lists_are_invalidated_without_keys_or_scan(
    private: Private, db_engine: AsyncEngine
) -> None:
    running, admin = private.running, private.admin
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice")
    await call(running.stub.GetTrending, pb.GetTrendingRequest())
    await call(running.stub.ListPostsByAuthor, pb.ListPostsByAuthorRequest(author_id="alice"))
    await admin.config_resetstat()

    response, _ = await call(running.stub.Invalidate, pb.InvalidateRequest(post_ids=["p1"]))
    assert response.keys_invalidated == 2  # trending and alice's list; p1 itself was never cached
    stats = await admin.info("commandstats")
    assert not {"cmdstat_keys", "cmdstat_scan"} & set(stats), stats


async def test_one_request_invalidates_users_and_posts_together(
    service: Running, db_engine: AsyncEngine
) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice")
    await call(service.stub.GetUser, pb.GetUserRequest(user_id="alice"))
    await call(service.stub.GetPost, pb.GetPostRequest(post_id="p1"))
    response, _ = await call(
        service.stub.Invalidate, pb.InvalidateRequest(user_ids=["alice"], post_ids=["p1"])
    )
    assert response.keys_invalidated == 2
    _, meta = await call(service.stub.GetUser, pb.GetUserRequest(user_id="alice"))
    assert meta["x-cache"] == "miss"


async def test_invalidate_by_tag_clears_every_list_of_that_tag_only(
    service: Running, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice")
    await add_comment(db_engine, "c1", "p1", "alice")
    stub = service.stub
    await call(stub.GetPost, pb.GetPostRequest(post_id="p1"))
    await call(stub.GetTrending, pb.GetTrendingRequest())
    await call(stub.ListPostsByAuthor, pb.ListPostsByAuthorRequest(author_id="alice"))
    await call(stub.ListCommentsByAuthor, pb.ListCommentsByAuthorRequest(author_id="alice"))

    response, _ = await call(stub.Invalidate, pb.InvalidateRequest(tags=["post_lists"]))
    assert response.keys_invalidated == 2
    remaining = await _cached_keys(redis_client, service.prefix)
    assert {"post:p1", "comments:author:alice"} <= remaining
    assert not {"posts:trending", "posts:author:alice"} & remaining

    response, _ = await call(stub.Invalidate, pb.InvalidateRequest(tags=["comment_lists"]))
    assert response.keys_invalidated == 1
    code, details, reason = await error_of(stub.Invalidate, pb.InvalidateRequest(tags=["posts:*"]))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_TAG")
    assert "post_lists" in details


async def test_invalidate_everything_bumps_the_generation_without_touching_keys(
    private: Private, db_engine: AsyncEngine
) -> None:
    running, admin = private.running, private.admin
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice", title="v1")
    await call(running.stub.GetPost, pb.GetPostRequest(post_id="p1"))
    await call(running.stub.GetUser, pb.GetUserRequest(user_id="alice"))
    await set_post(db_engine, "p1", title="v2")
    before = int(await admin.get(running.prefix + "generation"))
    await admin.config_resetstat()

    response, _ = await call(running.stub.Invalidate, pb.InvalidateRequest(everything=True))
    assert response.generation == before + 1
    stats = await admin.info("commandstats")
    # O(1): one script that increments the generation and publishes one event; nothing deleted.
    assert stats["cmdstat_incr"]["calls"] == 2  # the generation, and the event sequence
    assert not {"cmdstat_del", "cmdstat_keys", "cmdstat_scan"} & set(stats), stats
    fresh, meta = await call(running.stub.GetPost, pb.GetPostRequest(post_id="p1"))
    assert (fresh.post.title, meta["x-cache"]) == ("v2", "miss")
    _, meta = await call(running.stub.GetUser, pb.GetUserRequest(user_id="alice"))
    assert meta["x-cache"] == "miss"
    _, meta = await call(running.stub.GetUser, pb.GetUserRequest(user_id="alice"))
    assert meta["x-cache"] == "hit", "caching goes on in the new generation"


async def test_invalidating_every_post_list_costs_the_lists_not_the_keyspace(
    private: Private, db_engine: AsyncEngine
) -> None:
    running, admin = private.running, private.admin
    # 100,000 unrelated cached keys, as a busy deployment would hold.
    async with admin.pipeline(transaction=False) as pipe:
        for n in range(100_000):
            pipe.set(f"{running.prefix}post:bulk{n}", b"x" * 32, ex=600)
        await pipe.execute()
    await add_user(db_engine, "alice")
    authors = [f"author{n}" for n in range(40)]
    for author in authors:
        await add_user(db_engine, author, full=False)
        await add_post(db_engine, f"{author}-post", author)
        await call(running.stub.ListPostsByAuthor, pb.ListPostsByAuthorRequest(author_id=author))
    await call(running.stub.GetTrending, pb.GetTrendingRequest())
    await call(running.stub.GetArchived, pb.GetArchivedRequest())
    lists = len(authors) + 2
    await admin.config_resetstat()

    response, _ = await call(running.stub.Invalidate, pb.InvalidateRequest(tags=["post_lists"]))
    assert response.keys_invalidated == lists
    stats = await admin.info("commandstats")
    assert not {"cmdstat_keys", "cmdstat_scan"} & set(stats), "no walk of the keyspace"
    # Each list costs one DEL of its value and one of its lease, and the tag one more:
    # proportional to the lists, whatever else Redis holds.
    assert stats["cmdstat_del"]["calls"] == 2 * lists + 1
    assert stats["cmdstat_smembers"]["calls"] == 1
    assert await admin.dbsize() >= 100_000, "the unrelated keys are untouched"
