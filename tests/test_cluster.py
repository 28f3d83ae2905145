"""The service on a real Redis Cluster: the contract, leases, invalidation, the near cache, a reshard
under reads, and a master killed under reads (CACHEASIDE_REDIS_CLUSTER=true).
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from client.client import CACHE_DEBUG_METADATA
from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server.config import Settings
from tests.conftest import Running, start_service, stop_service
from tests.data import add_post, add_user, set_post
from tests.helpers import call, until
from tests.redis_cluster import Cluster, redis_cluster
from tests.test_leases import LoadGate
from tests.test_reads import EVERY_READ, _seed_small

pytestmark = pytest.mark.parametrize("database", ["postgresql"], indirect=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Three masters with a replica each, for this module."""
    with redis_cluster() as running:
        yield running


@pytest.fixture
async def on_cluster(cluster: Cluster, settings: Settings, db_engine: AsyncEngine) -> AsyncIterator[Running]:
    """A service whose cache is the cluster."""
    running = await start_service(
        settings,
        redis_url=cluster.url,
        redis_cluster=True,
        redis_timeout_ms=1000,
        redis_breaker_cooldown_ms=200,
    )
    yield running
    await stop_service(running)


@pytest.mark.parametrize(
    ("rpc", "request_message", "keys", "tier"), EVERY_READ, ids=[r[0] for r in EVERY_READ]
)
async def test_every_read_misses_then_hits_on_a_cluster(
    on_cluster: Running, db_engine: AsyncEngine, rpc: str, request_message: Any, keys: list[str], tier: Any
) -> None:
    await _seed_small(db_engine)
    method = getattr(on_cluster.stub, rpc)
    first, meta = await call(method, request_message, metadata=CACHE_DEBUG_METADATA)
    assert (meta["x-cache"], meta["x-cache-tier"]) == ("miss", tier.value)
    second, meta = await call(method, request_message)
    assert meta["x-cache"] == "hit"
    assert second == first


async def test_a_batch_across_every_slot_is_one_query_and_then_hits(
    on_cluster: Running, db_engine: AsyncEngine
) -> None:
    await add_user(db_engine, "alice")
    ids = [f"p{n}" for n in range(100)]
    for post_id in ids:
        await add_post(db_engine, post_id, "alice")
    loads = on_cluster.app.engine.stats.loads
    batch, meta = await call(on_cluster.stub.BatchGetPosts, pb.BatchGetPostsRequest(post_ids=ids))
    assert meta["x-cache"] == "miss"
    assert [p.id for p in batch.posts] == ids
    assert on_cluster.app.engine.stats.loads == loads + 1
    _, meta = await call(on_cluster.stub.BatchGetPosts, pb.BatchGetPostsRequest(post_ids=ids))
    assert meta["x-cache"] == "hit"


async def test_invalidation_by_id_tag_and_everything_on_a_cluster(
    on_cluster: Running, db_engine: AsyncEngine
) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice", title="v1")
    stub = on_cluster.stub
    for request in (pb.GetPostRequest(post_id="p1"),):
        await call(stub.GetPost, request)
    await call(stub.GetTrending, pb.GetTrendingRequest())
    await call(stub.ListPostsByAuthor, pb.ListPostsByAuthorRequest(author_id="alice"))
    await set_post(db_engine, "p1", title="v2")
    response, _ = await call(stub.Invalidate, pb.InvalidateRequest(post_ids=["p1"]))
    assert response.keys_invalidated == 3  # the post, trending, and alice's list (through the tag)
    fresh, meta = await call(stub.GetPost, pb.GetPostRequest(post_id="p1"))
    assert (fresh.post.title, meta["x-cache"]) == ("v2", "miss")
    _, meta = await call(stub.ListPostsByAuthor, pb.ListPostsByAuthorRequest(author_id="alice"))
    assert meta["x-cache"] == "miss"
    await call(stub.Invalidate, pb.InvalidateRequest(everything=True))
    _, meta = await call(stub.GetPost, pb.GetPostRequest(post_id="p1"))
    assert meta["x-cache"] == "miss"


@pytest.mark.parametrize(
    ("rpc", "request_message", "key"),
    [
        ("GetPost", pb.GetPostRequest(post_id="p1"), "post:p1"),
        ("GetTrending", pb.GetTrendingRequest(), "posts:trending"),
    ],
)
async def test_a_fill_that_began_before_an_invalidation_is_refused_on_a_cluster(
    on_cluster: Running, db_engine: AsyncEngine, rpc: str, request_message: Any, key: str
) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice", title="version 1")
    engine = on_cluster.app.engine
    gate = LoadGate(engine, key)
    reader = asyncio.create_task(call(getattr(on_cluster.stub, rpc), request_message))
    await gate.loaded.wait()
    await set_post(db_engine, "p1", title="version 2")
    await call(on_cluster.stub.Invalidate, pb.InvalidateRequest(post_ids=["p1"]))
    refused = engine.stats.fills_refused
    gate.proceed.set()
    await reader
    assert engine.stats.fills_refused == refused + 1
    fresh, _ = await call(getattr(on_cluster.stub, rpc), request_message)
    title = fresh.post.title if rpc == "GetPost" else fresh.posts[0].title
    assert title == "version 2"


async def test_the_near_cache_hears_invalidations_on_a_cluster(
    cluster: Cluster, settings: Settings, db_engine: AsyncEngine
) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice")
    options = {"redis_url": cluster.url, "redis_cluster": True, "redis_timeout_ms": 1000}
    reader, writer = await start_service(settings, **options), await start_service(settings, **options)
    try:
        near = reader.app.engine.near
        assert near is not None
        async with asyncio.timeout(10):
            await reader.app.engine.notifier.connected.wait()  # type: ignore[union-attr]
        for _ in range(3):
            await call(reader.stub.GetPost, pb.GetPostRequest(post_id="p1"))
        assert len(near) == 1
        await call(writer.stub.Invalidate, pb.InvalidateRequest(post_ids=["p1"]))
        await until(lambda: len(near) == 0, timeout_s=2)
    finally:
        await stop_service(reader)
        await stop_service(writer)


async def _read_continuously(
    running: Running, ids: list[str], stop: asyncio.Event, failures: list[str]
) -> int:
    reads = 0
    while not stop.is_set():
        for post_id in ids:
            try:
                await call(running.stub.GetPost, pb.GetPostRequest(post_id=post_id), timeout=10)
            except grpc.aio.AioRpcError as error:
                failures.append(f"{post_id}: {error.code().name} {error.details()}")
            reads += 1
    return reads


async def test_reads_never_fail_while_slots_are_resharded(
    cluster: Cluster, on_cluster: Running, db_engine: AsyncEngine
) -> None:
    await add_user(db_engine, "alice")
    ids = [f"p{n}" for n in range(50)]
    for post_id in ids:
        await add_post(db_engine, post_id, "alice")
    stop = asyncio.Event()
    failures: list[str] = []
    reader = asyncio.create_task(_read_continuously(on_cluster, ids, stop, failures))
    source, target = cluster.masters()[:2]
    command = [
        "redis-cli", "--cluster", "reshard", f"127.0.0.1:{source}",
        "--cluster-from", cluster.node_id(source), "--cluster-to", cluster.node_id(target),
        "--cluster-slots", "2000", "--cluster-yes",
    ]  # fmt: skip
    done = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=120, check=False
    )
    stop.set()
    reads = await reader
    assert done.returncode == 0, done.stderr[-500:]
    assert reads > len(ids)
    assert failures == []


async def test_a_killed_master_fails_no_read_and_caching_resumes_after_failover(
    cluster: Cluster, on_cluster: Running, db_engine: AsyncEngine
) -> None:
    await add_user(db_engine, "alice")
    ids = [f"p{n}" for n in range(50)]
    for post_id in ids:
        await add_post(db_engine, post_id, "alice")
    victim = next(port for port in cluster.masters() if port != cluster.ports[0])  # not the URL's node
    stop = asyncio.Event()
    failures: list[str] = []
    reader = asyncio.create_task(_read_continuously(on_cluster, ids, stop, failures))
    await asyncio.sleep(0.2)  # reads under way before the crash
    cluster.kill(victim)
    await asyncio.to_thread(cluster.wait_ok, 30)  # until a replica has taken over its slots
    await asyncio.sleep(0.5)
    stop.set()
    await reader
    assert failures == []

    async def caching() -> bool:
        outcomes = set()
        for post_id in ids:
            _, meta = await call(on_cluster.stub.GetPost, pb.GetPostRequest(post_id=post_id))
            outcomes.add(meta["x-cache"])
        return outcomes == {"hit"}

    # The client re-reads the slot map when a call fails and when the breaker probes.
    async with asyncio.timeout(90):
        while not await caching():  # noqa: ASYNC110  (the client refreshes its slot map on its own)
            await asyncio.sleep(0.2)
