"""Stale-if-error: when the database is down or too slow, a stale copy answers with x-cache: stale.

The database is real PostgreSQL behind a TCP proxy the test controls, so it can look down or hung
without being stopped under other tests. Entries are aged with the engine's clock, not by waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server.config import Settings
from tests.conftest import Database, Running, start_service, stop_service
from tests.data import add_post, add_user, set_post
from tests.helpers import call, error_of, until
from tests.tcp_proxy import ProxyMode, TcpProxy


@pytest.fixture
async def proxy(database: Database) -> AsyncIterator[TcpProxy]:
    """A proxy in front of the run's PostgreSQL."""
    if database.kind != "postgresql":
        pytest.skip("a networked database is needed to cut it off; SQLite is a file")
    upstream = urlsplit(make_url(database.url).render_as_string(hide_password=False).replace("+asyncpg", ""))
    running = await TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 5432).start()
    yield running
    await running.close()


@pytest.fixture
async def behind_proxy(settings: Settings, db_engine: AsyncEngine, proxy: TcpProxy) -> AsyncIterator[Running]:
    """A service whose database connections go through the proxy; its clock is the test's."""
    running = await _start_behind(proxy, settings, db_timeout_ms=500, db_error_backoff_ms=1, ttl_warm_s=60)
    yield running
    await stop_service(running)


async def _start_behind(proxy: TcpProxy, settings: Settings, **overrides: Any) -> Running:
    url = make_url(settings.database_url).set(host="127.0.0.1", port=proxy.port)
    return await start_service(settings, database_url=url.render_as_string(hide_password=False), **overrides)


async def test_database_down_serves_stale_copies_and_unavailable_otherwise(
    behind_proxy: Running, db_engine: AsyncEngine, proxy: TcpProxy
) -> None:
    await add_user(db_engine, "alice")
    for post_id in ("p1", "p2", "p3"):
        await add_post(db_engine, post_id, "alice", title=f"{post_id} version 1")
    stub = behind_proxy.stub
    engine = behind_proxy.app.engine
    for post_id in ("p1", "p2"):
        await call(stub.GetPost, pb.GetPostRequest(post_id=post_id))
    now = engine.clock() + 70  # past the 60 s TTL and its jitter, well within max-stale
    engine.clock = lambda: now

    proxy.set_mode(ProxyMode.REFUSE)
    response, meta = await call(stub.GetPost, pb.GetPostRequest(post_id="p1"))
    assert (response.post.title, meta["x-cache"]) == ("p1 version 1", "stale")
    code, details, reason = await error_of(stub.GetPost, pb.GetPostRequest(post_id="p3"))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
    assert "database is unreachable" in details

    proxy.set_mode(ProxyMode.BLACKHOLE)  # hung, not down: the load times out after 500 ms
    response, meta = await call(stub.GetPost, pb.GetPostRequest(post_id="p2"))
    assert (response.post.title, meta["x-cache"]) == ("p2 version 1", "stale")

    await set_post(db_engine, "p1", title="p1 version 2")
    proxy.set_mode(ProxyMode.FORWARD)
    response, meta = await call(stub.GetPost, pb.GetPostRequest(post_id="p1"))
    assert (response.post.title, meta["x-cache"]) == ("p1 version 2", "miss")
    response, meta = await call(stub.GetPost, pb.GetPostRequest(post_id="p3"))
    assert (response.post.title, meta["x-cache"]) == ("p3 version 1", "miss")


async def test_an_invalidated_key_is_never_served_stale(
    behind_proxy: Running, db_engine: AsyncEngine, proxy: TcpProxy
) -> None:
    # Stale copies stand in for an expired value, never for one known to be wrong.
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice")
    await call(behind_proxy.stub.GetPost, pb.GetPostRequest(post_id="p1"))
    await call(behind_proxy.stub.Invalidate, pb.InvalidateRequest(post_ids=["p1"]))
    proxy.set_mode(ProxyMode.REFUSE)
    code, _, _ = await error_of(behind_proxy.stub.GetPost, pb.GetPostRequest(post_id="p1"))
    assert code == grpc.StatusCode.UNAVAILABLE


async def test_after_a_failed_load_other_callers_back_off_instead_of_piling_on(
    settings: Settings, db_engine: AsyncEngine, proxy: TcpProxy
) -> None:
    url = make_url(settings.database_url).set(host="127.0.0.1", port=proxy.port)
    running = await start_service(
        settings, database_url=url.render_as_string(hide_password=False), db_error_backoff_ms=60_000
    )
    try:
        proxy.set_mode(ProxyMode.REFUSE)
        code, _, reason = await error_of(running.stub.GetPost, pb.GetPostRequest(post_id="p1"))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
        loads = running.app.engine.stats.loads
        code, details, reason = await error_of(running.stub.GetPost, pb.GetPostRequest(post_id="p1"))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_BACKOFF")
        assert "retry in" in details
        assert running.app.engine.stats.loads == loads, "no new load while the error mark stands"
    finally:
        await stop_service(running)


async def test_a_copy_invalidated_while_its_reload_fails_is_not_served_stale(
    behind_proxy: Running, db_engine: AsyncEngine, proxy: TcpProxy
) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice")
    engine = behind_proxy.app.engine
    await call(behind_proxy.stub.GetPost, pb.GetPostRequest(post_id="p1"))
    now = engine.clock() + 70
    engine.clock = lambda: now
    proxy.set_mode(ProxyMode.BLACKHOLE)  # the reload will hang until its 500 ms timeout
    reader = asyncio.create_task(error_of(behind_proxy.stub.GetPost, pb.GetPostRequest(post_id="p1")))
    await until(lambda: engine.stats.loads >= 2)  # the reader holds the expired copy and is loading
    await call(behind_proxy.stub.Invalidate, pb.InvalidateRequest(post_ids=["p1"]))
    code, _, _ = await reader
    assert code == grpc.StatusCode.UNAVAILABLE, "the copy was invalidated: serving it would undo that"


async def test_a_load_is_two_round_trips_to_the_database(
    settings: Settings, db_engine: AsyncEngine, proxy: TcpProxy
) -> None:
    # The checkout's ping and the SELECT: no BEGIN and ROLLBACK around a single statement, which on a
    # distant database (or the soak's 200 ms) would make every load three times slower. One pooled
    # connection, and no health check or audit pass to send anything else through the proxy meanwhile.
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice")
    running = await _start_behind(
        proxy, settings, db_pool_size=1, health_interval_ms=3_600_000, audit_interval_s=0
    )
    try:
        stub = running.stub
        _, meta = await call(stub.GetPost, pb.GetPostRequest(post_id="p1"))
        assert meta["x-cache"] == "miss"
        await stub.Invalidate(pb.InvalidateRequest(post_ids=["p1"]))
        before = proxy.sent_upstream  # the connection is open and the statement prepared
        _, meta = await call(stub.GetPost, pb.GetPostRequest(post_id="p1"))
        assert meta["x-cache"] == "miss"
        assert proxy.sent_upstream - before == 2
    finally:
        await stop_service(running)
