"""The near cache: hits without Redis, and coherent across instances through sequenced cache events."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis
from prometheus_client import generate_latest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from client.client import CACHE_DEBUG_METADATA
from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server.cache.near import NearCache
from server.config import Settings
from tests.conftest import Running, start_service, stop_service
from tests.data import add_post, add_user, set_post
from tests.helpers import call, until


async def _admitted(running: Running, post_id: str) -> NearCache:
    """Read until the post sits in the instance's near cache (the second read admits it) and its
    answer is held (a request is held the second time a near-cache hit offers it: the fourth read);
    the instance's near cache."""
    near = running.app.engine.near
    assert near is not None
    async with asyncio.timeout(10):
        await running.app.engine.notifier.connected.wait()  # type: ignore[union-attr]
    for _ in range(4):
        await call(running.stub.GetPost, pb.GetPostRequest(post_id=post_id))
    assert near.get(f"post:{post_id}", int(time.time() * 1000)) is not None
    return near


@pytest.fixture
async def two(
    settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> AsyncIterator[list[Running]]:
    """Two instances sharing Redis and the database, each with its own near cache."""
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice", title="version 1")
    await add_post(db_engine, "p2", "alice", title="other")
    instances = [await start_service(settings), await start_service(settings)]
    yield instances
    for running in instances:
        await stop_service(running)


async def test_a_near_hit_does_not_ask_redis(two: list[Running]) -> None:
    first, _ = two
    near = await _admitted(first, "p1")
    attempts = first.app.engine.store.stats.attempts
    response, meta = await call(first.stub.GetPost, pb.GetPostRequest(post_id="p1"))
    assert (response.post.title, meta["x-cache"]) == ("version 1", "hit")
    assert first.app.engine.store.stats.attempts == attempts
    scraped = generate_latest(first.app.metrics.registry).decode()
    hits = float(near.stats.hits + near.stats.answered)  # answered whole, or from the entries
    assert f'cacheaside_near_cache_total{{event="hits"}} {hits}' in scraped
    assert f"cacheaside_near_cache_answered_total {float(near.stats.answered)}" in scraped
    assert f"cacheaside_near_cache_answer_bytes {float(near.answer_bytes)}" in scraped


async def test_another_instances_invalidation_reaches_the_near_cache_at_once(
    two: list[Running], db_engine: AsyncEngine
) -> None:
    reader, writer = two
    await _admitted(reader, "p1")
    near = await _admitted(reader, "p2")
    await set_post(db_engine, "p1", title="version 2")
    started = time.monotonic()
    await call(writer.stub.Invalidate, pb.InvalidateRequest(post_ids=["p1"]))
    await until(lambda: near.get("post:p1", int(time.time() * 1000)) is None, timeout_s=1.0)
    delay_ms = (time.monotonic() - started) * 1000
    response, _ = await call(reader.stub.GetPost, pb.GetPostRequest(post_id="p1"))
    assert response.post.title == "version 2"
    assert near.get("post:p2", int(time.time() * 1000)) is not None, "only the invalidated key goes"
    assert delay_ms < 1000


async def test_a_gap_in_the_event_sequence_flushes_everything(
    two: list[Running], redis_client: aioredis.Redis
) -> None:
    reader, _ = two
    near = await _admitted(reader, "p1")
    flushes = near.stats.flushes
    counter = reader.prefix + "events:seq"
    sequence = int(await redis_client.get(counter) or 0)
    # An event numbered past the next one: the ones between were lost on the way.
    await redis_client.publish(
        reader.prefix + "events", f"{counter} {sequence + 5} f {reader.prefix}post:unrelated"
    )
    await until(lambda: near.stats.flushes > flushes)
    assert len(near) == 0
    assert reader.app.engine.notifier.gaps == 1  # type: ignore[union-attr]


async def test_a_lost_event_connection_flushes_and_stops_near_hits_until_it_is_back(
    two: list[Running], redis_client: aioredis.Redis
) -> None:
    reader, _ = two
    near = await _admitted(reader, "p1")
    notifier = reader.app.engine.notifier
    assert notifier is not None
    name = f"cacheaside-events:{reader.prefix}"
    ours = [
        client["id"] for client in await redis_client.client_list(_type="pubsub") if client["name"] == name
    ]
    assert ours
    for client_id in ours:
        await redis_client.client_kill_filter(_id=client_id)
    await until(lambda: not notifier.connected.is_set())
    assert len(near) == 0
    assert near.answer_bytes == 0, "the answers built from its entries go with them"
    attempts = reader.app.engine.store.stats.attempts
    await call(reader.stub.GetPost, pb.GetPostRequest(post_id="p1"))
    assert reader.app.engine.store.stats.attempts > attempts, "no near hits while events are not heard"
    async with asyncio.timeout(10):
        await notifier.connected.wait()


async def test_invalidate_everything_flushes_every_instances_near_cache(two: list[Running]) -> None:
    reader, writer = two
    near = await _admitted(reader, "p1")
    flushes = near.stats.flushes
    await call(writer.stub.Invalidate, pb.InvalidateRequest(everything=True))
    await until(lambda: near.stats.flushes > flushes, timeout_s=1.0)
    assert len(near) == 0
    assert near.answer_bytes == 0


async def test_the_same_read_again_is_answered_whole_until_an_invalidation_clears_it(
    two: list[Running], db_engine: AsyncEngine
) -> None:
    reader, writer = two
    near = await _admitted(reader, "p1")  # its last read was a near hit: the answer is held
    assert near.answer_bytes > 0
    request = pb.GetPostRequest(post_id="p1")
    answered, attempts = near.stats.answered, reader.app.engine.store.stats.attempts
    first, _ = await call(reader.stub.GetPost, request)
    again, again_meta = await call(reader.stub.GetPost, request)
    assert near.stats.answered == answered + 2
    assert reader.app.engine.store.stats.attempts == attempts, "no Redis call"
    assert again == first
    assert first.post.title == "version 1"
    assert again_meta["x-cache"] == "hit"
    assert "x-cache-tier" not in again_meta, "the tier only when asked"
    assert "x-request-id" not in again_meta
    # A caller's request id is set first: the held answer's metadata is added to it, not put over it.
    with_id, with_id_meta = await call(reader.stub.GetPost, request, metadata=(("x-request-id", "held-1"),))
    assert near.stats.answered == answered + 3, "held answers serve calls with a request id too"
    assert (with_id, with_id_meta["x-cache"], with_id_meta["x-request-id"]) == (first, "hit", "held-1")
    for _ in range(3):
        asked, asked_meta = await call(reader.stub.GetPost, request, metadata=CACHE_DEBUG_METADATA)
        assert (asked, asked_meta["x-cache"], asked_meta["x-cache-tier"]) == (first, "hit", "warm")
    assert reader.app.engine.store.stats.attempts == attempts, "near hits too"
    assert near.stats.answered == answered + 3, "built again each time, never from a held answer"
    after, after_meta = await call(reader.stub.GetPost, request)
    assert near.stats.answered == answered + 4, "the held answer serves plain reads still"
    assert (after, after_meta["x-cache"]) == (first, "hit")
    assert "x-cache-tier" not in after_meta, "no debug read left its metadata on the held answer"

    await set_post(db_engine, "p1", title="version 2")
    await call(writer.stub.Invalidate, pb.InvalidateRequest(post_ids=["p1"]))
    await until(lambda: near.answer_bytes == 0, timeout_s=1.0)
    response, meta = await call(reader.stub.GetPost, request)
    assert (response.post.title, meta["x-cache"]) == ("version 2", "miss")  # Invalidate deleted it


async def test_answers_are_kept_apart_per_method_batches_included(
    two: list[Running], db_engine: AsyncEngine
) -> None:
    reader, writer = two
    await add_user(db_engine, "p2")  # a user with a post's id: GetUser and GetPost send the same bytes
    assert (
        pb.GetUserRequest(user_id="p2").SerializeToString()
        == pb.GetPostRequest(post_id="p2").SerializeToString()
    )
    near = reader.app.engine.near
    assert near is not None
    async with asyncio.timeout(10):
        await reader.app.engine.notifier.connected.wait()  # type: ignore[union-attr]
    batch = pb.BatchGetPostsRequest(post_ids=["p1", "p2"])
    for _ in range(4):
        user, _ = await call(reader.stub.GetUser, pb.GetUserRequest(user_id="p2"))
        post, _ = await call(reader.stub.GetPost, pb.GetPostRequest(post_id="p2"))
        posts, _ = await call(reader.stub.BatchGetPosts, batch)
    answered = near.stats.answered
    user, _ = await call(reader.stub.GetUser, pb.GetUserRequest(user_id="p2"))
    post, _ = await call(reader.stub.GetPost, pb.GetPostRequest(post_id="p2"))
    posts, _ = await call(reader.stub.BatchGetPosts, batch)
    assert near.stats.answered == answered + 3
    assert (user.user.id, post.post.id, post.post.title) == ("p2", "p2", "other")
    assert [p.title for p in posts.posts] == ["version 1", "other"]

    await set_post(db_engine, "p1", title="version 2")
    await call(writer.stub.Invalidate, pb.InvalidateRequest(post_ids=["p1"]))
    await until(lambda: near.answer_bytes == 0, timeout_s=1.0)
    posts, _ = await call(reader.stub.BatchGetPosts, batch)
    assert [p.title for p in posts.posts] == ["version 2", "other"]


async def test_a_missing_id_is_never_held_as_an_answer(two: list[Running]) -> None:
    reader, _ = two
    near = await _admitted(reader, "p1")
    held = near.answer_bytes
    for _ in range(4):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call(reader.stub.GetPost, pb.GetPostRequest(post_id="nope"))
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert near.answer_bytes == held


async def test_no_answer_is_held_once_early_refresh_may_start(
    settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> None:
    # With this beta, XFetch may refresh a post from its first second on (a load of at least 1 ms,
    # times 10^6, times 30, is longer than the TTL), so each read must reach the per-key path, whose
    # draws decide: none may be answered whole. The draws themselves never refresh here (a draw of 0
    # puts the refresh at expiry), so nothing else changes the entry between the reads.
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice", title="version 1")
    running = await start_service(settings, xfetch_beta_warm=1e6)
    running.app.engine.random = lambda: 0.0
    try:
        near = await _admitted(running, "p1")
        hits = near.stats.hits
        for _ in range(3):
            await call(running.stub.GetPost, pb.GetPostRequest(post_id="p1"))
        assert (near.answer_bytes, near.stats.answered) == (0, 0)
        assert near.stats.hits == hits + 3
        assert running.app.engine.stats.early_refreshes == 0
    finally:
        await stop_service(running)


async def test_a_held_answer_ends_when_the_engines_clock_says_its_entry_is_stale(two: list[Running]) -> None:
    reader, _ = two
    near = await _admitted(reader, "p1")
    answered = near.stats.answered
    await call(reader.stub.GetPost, pb.GetPostRequest(post_id="p1"))
    assert near.stats.answered == answered + 1
    later = reader.app.engine.clock() + 3600  # past the post's TTL: the wall clock stepped
    reader.app.engine.clock = lambda: later
    _, meta = await call(reader.stub.GetPost, pb.GetPostRequest(post_id="p1"))
    assert near.stats.answered == answered + 1, "not answered whole"
    assert meta["x-cache"] in ("miss", "stale"), "nor from the near cache: stale by that clock too"


async def test_a_held_answer_still_needs_the_read_token(
    settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice", title="version 1")
    running = await start_service(settings, read_token=SecretStr("reader-token"))
    token = (("authorization", "Bearer reader-token"),)
    try:
        near = running.app.engine.near
        assert near is not None
        async with asyncio.timeout(10):
            await running.app.engine.notifier.connected.wait()  # type: ignore[union-attr]
        for _ in range(5):  # a miss, the admitting read, two near hits (the second holds it), answered
            await call(running.stub.GetPost, pb.GetPostRequest(post_id="p1"), metadata=token)
        assert near.stats.answered == 1, "held, and answered whole"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(running.stub.GetPost, pb.GetPostRequest(post_id="p1"))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await stop_service(running)


async def test_a_held_answer_given_at_once_is_counted_timed_and_under_debug_logged_with_its_id(
    two: list[Running], caplog: pytest.LogCaptureFixture
) -> None:
    # A held answer is given before the guard makes an id or takes a place under the call limit: it
    # is still counted and timed, and under DEBUG logged with an id that comes back, as any call is.
    reader, _ = two
    near = await _admitted(reader, "p1")
    metrics = reader.app.metrics
    ok = metrics.rpc_requests.labels("GetPost", "OK")
    timed = metrics.rpc_duration.labels("GetPost")
    count, observed, seconds, answered = ok.value, sum(timed.counts), timed.sum, near.stats.answered
    hits = {tier: metrics.cache_outcomes.labels("GetPost", "hit", tier) for tier in ("hot", "warm", "cold")}
    hit_counts = {tier: count.value for tier, count in hits.items()}
    _, meta = await call(reader.stub.GetPost, pb.GetPostRequest(post_id="p1"))
    assert near.stats.answered == answered + 1, "answered at once"
    assert (ok.value, sum(timed.counts)) == (count + 1, observed + 1)
    assert timed.sum > seconds, "its duration is added to the histogram's sum"
    assert meta["x-cache"] == "hit"
    rose = {tier: count.value - hit_counts[tier] for tier, count in hits.items()}
    tier = reader.app.settings.tier_of("post").value
    assert rose == {name: int(name == tier) for name in hits}, "a hit of its tier, once"
    assert "x-request-id" not in meta

    caplog.set_level(logging.DEBUG, logger="server.observability")
    _, meta = await call(reader.stub.GetPost, pb.GetPostRequest(post_id="p1"))
    assert near.stats.answered == answered + 2
    logged = [r for r in caplog.records if r.getMessage() == "rpc ok"]
    assert len(logged) == 1
    assert re.fullmatch(r"[0-9a-f]{16}-[1-9][0-9]*", meta["x-request-id"]), meta
