"""Every bound is hit on purpose: message sizes, calls in progress, database loads, both pools.

Loads are held with the engine's after_load hook (after the database read, before the fill), so a
bound is full exactly when the test says, with no timing luck involved.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from client.proto.cacheaside.v1 import cache_service_pb2_grpc as pb_grpc
from server.cache import CacheEngine
from server.config import Settings
from tests.conftest import Running, start_service, stop_service
from tests.data import add_post, add_user
from tests.helpers import call, error_of, until

FAST_S = 0.5  # "at once": far below any timeout in play, far above a refusal's few milliseconds


class HeldLoads:
    """Holds every load that touches one of the keys after its database read, until released."""

    def __init__(self, engine: CacheEngine, *keys: str) -> None:
        self.held: list[str] = []
        self.release = asyncio.Event()
        self._keys = set(keys)
        engine.hooks.after_load = self._hold

    async def _hold(self, keys: Sequence[str]) -> None:
        if self._keys.intersection(keys):
            self.held.extend(keys)
            await self.release.wait()


@pytest.fixture
async def posts(db_engine: AsyncEngine) -> list[str]:
    """Four small posts, p0 to p3."""
    await add_user(db_engine, "alice")
    for n in range(4):
        await add_post(db_engine, f"p{n}", "alice")
    return [f"p{n}" for n in range(4)]


@pytest.fixture
async def bounded(
    settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis
) -> AsyncIterator[Running]:
    """A service with tight bounds: 1 KiB messages in and out, 3 calls in progress."""
    running = await start_service(
        settings, max_receive_message_bytes=1024, max_send_message_bytes=1024, max_concurrent_rpcs=3
    )
    yield running
    await stop_service(running)


async def test_a_request_over_the_size_limit_is_refused_and_the_server_stays_up(
    bounded: Running, posts: list[str]
) -> None:
    code, details, _ = await error_of(bounded.stub.GetPost, pb.GetPostRequest(post_id="p" * 2000))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    code, _, _ = await error_of(bounded.stub.BatchGetPosts, pb.BatchGetPostsRequest(post_ids=["p0"] * 500))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    response, _ = await call(bounded.stub.GetPost, pb.GetPostRequest(post_id="p0"))
    assert response.post.id == "p0"


async def test_a_response_over_the_size_limit_is_resource_exhausted_never_internal(
    bounded: Running, db_engine: AsyncEngine, posts: list[str]
) -> None:
    await add_post(db_engine, "long", "alice", body="x" * 5000)
    code, details, _ = await error_of(bounded.stub.GetPost, pb.GetPostRequest(post_id="long"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    response, _ = await call(bounded.stub.GetPost, pb.GetPostRequest(post_id="p0"))
    assert response.post.id == "p0"


async def test_calls_past_the_limit_are_refused_at_once_while_health_answers(
    bounded: Running, posts: list[str]
) -> None:
    stub, engine = bounded.stub, bounded.app.engine
    await call(stub.GetPost, pb.GetPostRequest(post_id="p0"))  # cached: a hit from now on
    held = HeldLoads(engine, "post:p1", "post:p2", "post:p3")
    calls = [asyncio.create_task(call(stub.GetPost, pb.GetPostRequest(post_id=p))) for p in ("p1", "p2")]
    await until(lambda: len(held.held) == 2)
    third = asyncio.create_task(call(stub.GetPost, pb.GetPostRequest(post_id="p3")))
    await until(lambda: "post:p3" in held.held)  # three calls in progress, none of them done

    started = time.monotonic()
    code, details, reason = await error_of(stub.GetPost, pb.GetPostRequest(post_id="p0"))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "CONCURRENCY_LIMIT")
    assert "CACHEASIDE_MAX_CONCURRENT_RPCS" in details
    assert time.monotonic() - started < FAST_S
    code, _, reason = await error_of(stub.Warm, pb.WarmRequest())
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "CONCURRENCY_LIMIT")

    health = health_pb2_grpc.HealthStub(bounded.channel)
    for service in ("", "liveness", "cacheaside.v1.CacheService"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=FAST_S)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, "probes are never refused"

    held.release.set()
    for task in (*calls, third):
        response, _ = await task
        assert response.post.id in {"p1", "p2", "p3"}
    # The slots came back: a full set of calls runs again.
    again = await asyncio.gather(*(call(stub.GetPost, pb.GetPostRequest(post_id=p)) for p in posts[:3]))
    assert [meta["x-cache"] for _, meta in again] == ["hit"] * 3


async def test_a_miss_past_the_load_limit_is_unavailable_at_once_and_hits_do_not_wait(
    settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis, posts: list[str]
) -> None:
    running = await start_service(settings, max_concurrent_loads=2, ttl_warm_s=60, ttl_jitter_pct=0)
    try:
        stub, engine = running.stub, running.app.engine
        await call(stub.GetPost, pb.GetPostRequest(post_id="p0"))
        held = HeldLoads(engine, "post:p1", "post:p2")
        loads = [asyncio.create_task(call(stub.GetPost, pb.GetPostRequest(post_id=p))) for p in ("p1", "p2")]
        await until(lambda: len(held.held) == 2)  # both load slots are taken

        started = time.monotonic()
        code, details, reason = await error_of(stub.GetPost, pb.GetPostRequest(post_id="p3"))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_SATURATED")
        assert "saturated" in details
        assert time.monotonic() - started < FAST_S
        assert engine.stats.loads_refused == 1
        assert running.app.metrics.registry.get_sample_value("cacheaside_db_loads_refused_total") == 1

        started = time.monotonic()
        _, meta = await call(stub.GetPost, pb.GetPostRequest(post_id="p0"))
        assert meta["x-cache"] == "hit"
        assert time.monotonic() - started < FAST_S, "a hit never waits behind loads"

        # Stale-if-error covers a refusal too: an expired copy answers while the slots are full.
        later = engine.clock() + 120  # past the 60 s TTL, within max-stale
        engine.clock = lambda: later
        _, meta = await call(stub.GetPost, pb.GetPostRequest(post_id="p0"))
        assert meta["x-cache"] == "stale"

        held.release.set()
        for task in loads:
            await task
        # A refusal leaves no error mark on the key: the next caller loads it at once.
        response, meta = await call(stub.GetPost, pb.GetPostRequest(post_id="p3"))
        assert (response.post.id, meta["x-cache"]) == ("p3", "miss")
    finally:
        await stop_service(running)


async def test_misses_past_the_waiting_limit_are_unavailable_at_once_and_hits_still_answer(
    settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis, posts: list[str]
) -> None:
    # A slow database: one load holds while callers pile up behind it. They are bounded apart from
    # the calls in progress, so the hits keep the rest of CACHEASIDE_MAX_CONCURRENT_RPCS.
    running = await start_service(settings, max_waiting_misses=2, max_concurrent_rpcs=4)
    try:
        stub, engine = running.stub, running.app.engine
        await call(stub.GetPost, pb.GetPostRequest(post_id="p0"))
        held = HeldLoads(engine, "post:p1")
        waiting = [asyncio.create_task(call(stub.GetPost, pb.GetPostRequest(post_id="p1"))) for _ in range(2)]
        await until(lambda: held.held == ["post:p1"] and engine.waiting_misses == 2)

        started = time.monotonic()
        code, details, reason = await error_of(stub.GetPost, pb.GetPostRequest(post_id="p2"))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_SATURATED")
        assert "CACHEASIDE_MAX_WAITING_MISSES" in details
        assert time.monotonic() - started < FAST_S
        code, _, reason = await error_of(stub.GetPost, pb.GetPostRequest(post_id="p1"))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_SATURATED"), "joining counts too"
        registry = running.app.metrics.registry
        assert registry.get_sample_value("cacheaside_engine_flights_total", {"event": "refused_waiting"}) == 2
        assert registry.get_sample_value("cacheaside_misses_waiting") == 2

        _, meta = await call(stub.GetPost, pb.GetPostRequest(post_id="p0"))
        assert meta["x-cache"] == "hit", "hits never count against the waiting misses"

        held.release.set()
        for task in waiting:
            response, meta = await task
            assert response.post.id == "p1"
        assert engine.waiting_misses == 0
        response, meta = await call(stub.GetPost, pb.GetPostRequest(post_id="p2"))
        assert (response.post.id, meta["x-cache"]) == ("p2", "miss"), "a refusal leaves no mark on the key"
    finally:
        await stop_service(running)


async def test_warming_waits_for_a_load_slot_where_a_miss_is_refused(
    settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis, posts: list[str]
) -> None:
    # Inline warming shares this process's load slots; a warm worker has its own bounded pool.
    running = await start_service(settings, max_concurrent_loads=1, warm_worker=False)
    try:
        stub, engine = running.stub, running.app.engine
        held = HeldLoads(engine, "post:p0")
        live = asyncio.create_task(call(stub.GetPost, pb.GetPostRequest(post_id="p0")))
        await until(lambda: held.held == ["post:p0"])
        warm = asyncio.create_task(call(stub.Warm, pb.WarmRequest(popular_posts=4, active_users=1)))
        slots = engine._loading.slots  # the test looks inside: the warmer queues for the slot
        await until(lambda: len(slots._waiters) == 2)  # its batches of posts and of users
        code, _, reason = await error_of(stub.GetPost, pb.GetPostRequest(post_id="p1"))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_SATURATED")

        held.release.set()
        await live
        response, _ = await warm
        # p0 may have been left to the live read's fill, if its lease was still held.
        assert (response.posts_warmed >= 3, response.users_warmed) == (True, 1)
    finally:
        await stop_service(running)


async def test_a_load_waits_for_a_database_connection_no_longer_than_the_timeout(
    settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis, posts: list[str]
) -> None:
    running = await start_service(settings, db_pool_size=1, db_timeout_ms=300, max_concurrent_loads=0)
    try:
        async with running.app.database.connect() as only_connection:
            started = time.monotonic()
            code, _, reason = await error_of(running.stub.GetPost, pb.GetPostRequest(post_id="p0"))
            assert code == grpc.StatusCode.UNAVAILABLE
            assert reason in {"DATABASE_TIMEOUT", "DATABASE_POOL_EXHAUSTED"}
            assert time.monotonic() - started < 0.3 + FAST_S
            assert only_connection.closed is False
        response, _ = await call(running.stub.GetPost, pb.GetPostRequest(post_id="p1"))
        assert response.post.id == "p1"
    finally:
        await stop_service(running)


async def test_a_read_waits_for_a_redis_connection_no_longer_than_the_timeout_then_bypasses(
    settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis, posts: list[str]
) -> None:
    running = await start_service(settings, redis_max_connections=1, redis_timeout_ms=200)
    try:
        pool = running.app.engine.store.redis.connection_pool
        connection = await pool.get_connection()
        try:
            started = time.monotonic()
            response, meta = await call(running.stub.GetPost, pb.GetPostRequest(post_id="p0"))
            assert (response.post.id, meta["x-cache"]) == ("p0", "bypass")
            assert time.monotonic() - started < 0.2 + FAST_S
        finally:
            await pool.release(connection)
        response, meta = await call(running.stub.GetPost, pb.GetPostRequest(post_id="p1"))
        assert (response.post.id, meta["x-cache"]) == ("p1", "miss")
    finally:
        await stop_service(running)


async def test_calls_the_busy_event_loop_cannot_take_up_are_shed_by_grpc_core_but_a_probe_queues_apart(
    settings: Settings, db_engine: AsyncEngine, redis_client: aioredis.Redis, posts: list[str]
) -> None:
    # The server's loop is held (it runs in this test's loop) while a thread sends 60 GetPosts: they
    # queue in grpc core, which sheds past CACHEASIDE_MAX_PENDING_RPCS (5, all past 15) without the
    # loop. Then a Health/Check to the probe port (CACHEASIDE_HEALTH_LISTEN), then 16 more GetPosts:
    # each is shed or takes one of the 15 places, so one of them is shed for sure. The Check, however
    # it interleaves with them, reaches a server of its own: it must wait in that server's queue and
    # be answered once the loop runs; in the reads' queue it would be CANCELLED like them. The loop is let
    # go once at least 44 of the first 60 (one meets the loop's standing request for a call, 15 wait)
    # and one of the later GetPosts have been shed, so no timing decides the outcome.
    running = await start_service(settings, max_pending_rpcs=5, health_listen="127.0.0.1:0")
    try:
        codes: list[grpc.StatusCode] = []
        shed = threading.Event()
        recorded = threading.Event()
        later_shed = threading.Event()
        lock = threading.Lock()
        outcome: dict[str, object] = {}

        def done(future: grpc.Future) -> None:
            with lock:
                codes.append(future.code())
                if codes.count(grpc.StatusCode.CANCELLED) >= 44:
                    shed.set()

        def send_all() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{running.app.port}") as channel:
                stub = pb_grpc.CacheServiceStub(channel)
                reads = [stub.GetPost.future(pb.GetPostRequest(post_id="p0"), timeout=30) for _ in range(60)]
                for read in reads:
                    read.add_done_callback(done)
                probes = grpc.insecure_channel(f"127.0.0.1:{running.app.probe_port}")
                probe = health_pb2_grpc.HealthStub(probes).Check.future(
                    health_pb2.HealthCheckRequest(service=""), timeout=30
                )
                later = [stub.GetPost.future(pb.GetPostRequest(post_id="p0"), timeout=30) for _ in range(16)]
                for read in later:
                    read.add_done_callback(lambda _: later_shed.set())  # only a shed one ends now
                later_shed.wait(timeout=20)
                outcome["later"] = [read.code() for read in later if read.done()]
                outcome["probe done while the loop was held"] = probe.done()
                recorded.set()
                outcome["probe"] = probe.code() if probe.exception() else probe.result().status
                probes.close()
                for read in reads + later:
                    read.exception()  # wait for every answer

        sender = threading.Thread(target=send_all)
        sender.start()
        # Blocking waits: the loop stays held until both are seen.
        assert shed.wait(timeout=20), f"grpc core shed {codes.count(grpc.StatusCode.CANCELLED)} calls"
        assert recorded.wait(timeout=30), "the sender never got that far"
        await asyncio.to_thread(sender.join)  # now the server's loop (this test's) runs again
        assert set(codes) == {grpc.StatusCode.CANCELLED, grpc.StatusCode.OK}, codes
        assert 5 <= codes.count(grpc.StatusCode.OK) <= 16, "the pending ones are served once the loop runs"
        assert running.app.engine.stats.loads <= 1, "a shed call did no work"
        assert grpc.StatusCode.CANCELLED in outcome["later"], outcome  # type: ignore[operator]
        assert outcome["probe done while the loop was held"] is False, outcome
        assert outcome["probe"] == health_pb2.HealthCheckResponse.SERVING, outcome
    finally:
        await stop_service(running)
