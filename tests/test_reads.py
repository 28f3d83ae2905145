"""Cache-aside reads: miss then hit for every RPC, tiers and TTLs, and answers that match the database."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine

from client.client import CACHE_DEBUG_METADATA
from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server.config import Tier
from tests.conftest import Running, start_service, stop_service
from tests.data import BASE_TIME, add_comment, add_post, add_user
from tests.helpers import assert_tier_ttl, call


async def _seed_small(engine: AsyncEngine) -> None:
    await add_user(engine, "alice")
    await add_user(engine, "bob", full=False)
    for n in range(12):
        await add_post(engine, f"p{n}", "alice", views=100 + n, created_at=BASE_TIME + timedelta(hours=n))
    await add_post(engine, "draft", "bob", published=False, views=10_000)
    for n in range(3):
        await add_post(
            engine,
            f"old{n}",
            "bob",
            published=False,
            archived=True,
            archived_at=BASE_TIME + timedelta(days=n),
        )
    await add_comment(engine, "c1", "p1", "bob", created_at=BASE_TIME)
    await add_comment(engine, "c2", "p2", "bob", created_at=BASE_TIME + timedelta(hours=1))


# (RPC, request, keys it must cache, tier of those keys)
EVERY_READ: list[tuple[str, Any, list[str], Tier]] = [
    ("GetUser", pb.GetUserRequest(user_id="alice"), ["user:alice"], Tier.WARM),
    (
        "GetUser",
        pb.GetUserRequest(user_id="alice", view=pb.USER_VIEW_FULL),
        ["user:alice", "user_profile:alice", "user_settings:alice"],
        Tier.WARM,
    ),
    ("GetPost", pb.GetPostRequest(post_id="p3"), ["post:p3"], Tier.WARM),
    ("GetTrending", pb.GetTrendingRequest(), ["posts:trending"], Tier.HOT),
    ("GetArchived", pb.GetArchivedRequest(), ["posts:archived"], Tier.COLD),
    ("ListPostsByAuthor", pb.ListPostsByAuthorRequest(author_id="alice"), ["posts:author:alice"], Tier.WARM),
    (
        "ListCommentsByAuthor",
        pb.ListCommentsByAuthorRequest(author_id="bob"),
        ["comments:author:bob"],
        Tier.WARM,
    ),
    (
        "BatchGetUsers",
        pb.BatchGetUsersRequest(user_ids=["alice", "bob"]),
        ["user:alice", "user:bob"],
        Tier.WARM,
    ),
    ("BatchGetPosts", pb.BatchGetPostsRequest(post_ids=["p1", "p2"]), ["post:p1", "post:p2"], Tier.WARM),
]


@pytest.mark.parametrize(
    ("rpc", "request_message", "keys", "tier"), EVERY_READ, ids=[r[0] for r in EVERY_READ]
)
async def test_every_read_misses_then_hits_with_its_tier_ttl(
    service: Running,
    db_engine: AsyncEngine,
    redis_client: aioredis.Redis,
    rpc: str,
    request_message: Any,
    keys: list[str],
    tier: Tier,
) -> None:
    await _seed_small(db_engine)
    method = getattr(service.stub, rpc)

    first, first_meta = await call(method, request_message, metadata=CACHE_DEBUG_METADATA)
    assert (first_meta["x-cache"], first_meta["x-cache-tier"]) == ("miss", tier.value)
    for key in keys:
        await assert_tier_ttl(redis_client, service.app.settings, service.prefix + key, tier)

    loads = service.app.engine.stats.loads
    # The hit through the handlers every plain read takes (the first asked, so took the debug twins).
    second, second_meta = await call(method, request_message)
    assert second_meta["x-cache"] == "hit"
    assert "x-cache-tier" not in second_meta, "the tier only when asked"
    assert second == first
    assert service.app.engine.stats.loads == loads, "a hit must not query the database"


async def test_the_tier_comes_back_only_to_a_read_that_asks_for_it(
    service: Running, db_engine: AsyncEngine
) -> None:
    await _seed_small(db_engine)
    request = pb.BatchGetPostsRequest(post_ids=["p1", "p2"])
    _, missed = await call(service.stub.BatchGetPosts, request)
    _, hit = await call(service.stub.BatchGetPosts, request)
    assert (missed["x-cache"], hit["x-cache"]) == ("miss", "hit")
    assert "x-cache-tier" not in missed
    assert "x-cache-tier" not in hit
    # Asked for alone: the tier, and no request id (none sent, nothing failed).
    _, meta = await call(service.stub.BatchGetPosts, request, metadata=CACHE_DEBUG_METADATA)
    assert (meta["x-cache"], meta["x-cache-tier"]) == ("hit", "warm")
    assert "x-request-id" not in meta
    # Asked for with a request id as well, before or after it: both come back, and the id too.
    for number, asked in enumerate(
        [
            (*CACHE_DEBUG_METADATA, ("x-request-id", "asked-0")),
            (("x-request-id", "asked-1"), *CACHE_DEBUG_METADATA),
        ]
    ):
        _, meta = await call(service.stub.BatchGetPosts, request, metadata=asked)
        assert (meta["x-cache"], meta["x-cache-tier"], meta["x-request-id"]) == (
            "hit",
            "warm",
            f"asked-{number}",
        )
    # Asking changes nothing about how a failure is told: its status, and the id made for it.
    failed = call(service.stub.GetPost, pb.GetPostRequest(post_id="nobody"), metadata=CACHE_DEBUG_METADATA)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await failed
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no post has id 'nobody'" in (raised.value.details() or "")
    assert dict(raised.value.trailing_metadata() or ()).get("x-request-id"), "a made id, as any failure gets"


async def test_user_views_match_the_rows(service: Running, db_engine: AsyncEngine) -> None:
    await add_user(db_engine, "alice")
    await add_user(db_engine, "bob", full=False)

    basic, _ = await call(service.stub.GetUser, pb.GetUserRequest(user_id="alice", view=pb.USER_VIEW_BASIC))
    assert basic.user.id == "alice"
    assert basic.user.email == "alice@example.com"
    assert basic.user.created_at.ToDatetime().replace(tzinfo=BASE_TIME.tzinfo) == BASE_TIME
    assert not basic.user.HasField("profile")
    assert not basic.user.HasField("settings")

    full, _ = await call(service.stub.GetUser, pb.GetUserRequest(user_id="alice", view=pb.USER_VIEW_FULL))
    assert full.user.name == basic.user.name
    assert full.user.profile == pb.Profile(bio="bio of alice", avatar_url="https://a/x.png")
    assert full.user.settings == pb.UserSettings(theme="dark", locale="de-DE", email_notifications=False)

    # A user without profile and settings rows: FULL answers with neither field set.
    bare, _ = await call(service.stub.GetUser, pb.GetUserRequest(user_id="bob", view=pb.USER_VIEW_FULL))
    assert bare.user.id == "bob"
    assert not bare.user.HasField("profile")
    assert not bare.user.HasField("settings")


async def test_trending_is_published_posts_by_views_cut_to_the_limit(
    service: Running, db_engine: AsyncEngine
) -> None:
    await _seed_small(db_engine)

    default, _ = await call(service.stub.GetTrending, pb.GetTrendingRequest())
    assert [p.id for p in default.posts] == [
        f"p{n}" for n in range(11, 1, -1)
    ]  # 10 by default; draft excluded

    # Every limit is served from the one cached list.
    three, meta = await call(service.stub.GetTrending, pb.GetTrendingRequest(limit=3))
    assert meta["x-cache"] == "hit"
    assert [p.id for p in three.posts] == ["p11", "p10", "p9"]
    everything, _ = await call(service.stub.GetTrending, pb.GetTrendingRequest(limit=100))
    assert len(everything.posts) == 12


async def test_archived_is_latest_archived_first(service: Running, db_engine: AsyncEngine) -> None:
    await _seed_small(db_engine)
    archived, _ = await call(service.stub.GetArchived, pb.GetArchivedRequest(limit=2))
    assert [p.id for p in archived.posts] == ["old2", "old1"]
    assert archived.posts[0].archived
    assert archived.posts[0].archived_at.ToDatetime().replace(
        tzinfo=BASE_TIME.tzinfo
    ) == BASE_TIME + timedelta(days=2)


async def test_author_lists_are_newest_first_and_empty_for_an_author_without_rows(
    service: Running, db_engine: AsyncEngine
) -> None:
    await _seed_small(db_engine)
    await add_user(db_engine, "carol", full=False)

    alice, _ = await call(
        service.stub.ListPostsByAuthor, pb.ListPostsByAuthorRequest(author_id="alice", limit=2)
    )
    assert [p.id for p in alice.posts] == ["p11", "p10"]
    comments, _ = await call(
        service.stub.ListCommentsByAuthor, pb.ListCommentsByAuthorRequest(author_id="bob")
    )
    assert [c.id for c in comments.comments] == ["c2", "c1"]
    assert comments.comments[0].post_id == "p2"

    carol, meta = await call(service.stub.ListPostsByAuthor, pb.ListPostsByAuthorRequest(author_id="carol"))
    assert list(carol.posts) == []
    assert meta["x-cache"] == "miss"
    _, meta = await call(service.stub.ListPostsByAuthor, pb.ListPostsByAuthorRequest(author_id="carol"))
    assert meta["x-cache"] == "hit", "an empty list is cached like any other"


async def test_batches_answer_in_request_order_with_one_query_for_all_misses(
    service: Running, db_engine: AsyncEngine
) -> None:
    await _seed_small(db_engine)
    engine = service.app.engine
    await call(service.stub.GetPost, pb.GetPostRequest(post_id="p5"))  # p5 is now cached

    before_loads = engine.stats.loads_by_family.get("post", 0)
    before_redis = engine.store.stats.attempts
    ids = ["p7", "p5", "p1", "p7", "p0"]
    batch, meta = await call(service.stub.BatchGetPosts, pb.BatchGetPostsRequest(post_ids=ids))
    assert [p.id for p in batch.posts] == ids
    assert meta["x-cache"] == "miss"
    assert engine.stats.loads_by_family["post"] == before_loads + 1, "one SQL query for every miss"
    assert engine.store.stats.attempts == before_redis + 3, (
        "one MGET, one pipelined lease, one pipelined fill"
    )

    again, meta = await call(service.stub.BatchGetPosts, pb.BatchGetPostsRequest(post_ids=ids))
    assert meta["x-cache"] == "hit"
    assert again == batch


async def test_batch_users_full_view_merges_each_users_parts(
    service: Running, db_engine: AsyncEngine
) -> None:
    await add_user(db_engine, "alice")
    await add_user(db_engine, "bob", full=False)
    request = pb.BatchGetUsersRequest(user_ids=["bob", "alice"], view=pb.USER_VIEW_FULL)
    batch, _ = await call(service.stub.BatchGetUsers, request)
    assert [u.id for u in batch.users] == ["bob", "alice"]
    assert not batch.users[0].HasField("profile")
    assert batch.users[1].profile.bio == "bio of alice"
    assert batch.users[1].settings.theme == "dark"


async def test_the_tier_of_each_family_is_a_setting(
    settings: Any, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice")
    running = await start_service(settings, family_tiers={**settings.family_tiers, "post": Tier.COLD})
    try:
        _, meta = await call(
            running.stub.GetPost, pb.GetPostRequest(post_id="p1"), metadata=CACHE_DEBUG_METADATA
        )
        assert meta["x-cache-tier"] == "cold"
        await assert_tier_ttl(redis_client, running.app.settings, running.prefix + "post:p1", Tier.COLD)
    finally:
        await stop_service(running)
