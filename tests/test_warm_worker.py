"""Warming runs in a child at idle CPU priority: it warms, stops when its caller goes, survives a crash.

A warm's query is held by a real table lock (PostgreSQL), so the cancel and the kill land while
the child is known to be warming.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server import db, warm_child
from server.app import create_app
from server.cache.types import DatabaseSaturated, LoadTimeout
from server.config import Settings
from server.errors import ServiceError
from server.warm_worker import WarmWorker
from server.warming import Warmer
from tests.conftest import Running, start_service, stop_service
from tests.data import add_post, add_user
from tests.helpers import call, posts_lock_waiters, posts_locked, until_async
from tests.tcp_proxy import TcpProxy


async def _posts(engine: AsyncEngine, count: int) -> None:
    await add_user(engine, "alice")
    for n in range(count):
        await add_post(engine, f"p{n:02d}", "alice", views=n)


# The child's query waits on the test's lock for as long as the test holds it.
_PATIENT = {"db_timeout_ms": 30_000, "lease_ttl_ms": 31_000}


def _worker(running: Running) -> WarmWorker:
    assert isinstance(running.app.warmer, WarmWorker)
    return running.app.warmer


async def test_warm_runs_in_a_child_at_idle_priority(settings: Settings, db_engine: AsyncEngine) -> None:
    await _posts(db_engine, 12)
    running = await start_service(settings, warm_batch=5)
    try:
        response, _ = await call(running.stub.Warm, pb.WarmRequest(popular_posts=12, active_users=1))
        pid = _worker(running).pid
        assert pid is not None
        assert pid != os.getpid()
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
        # Written by the child, read back by the server as hits.
        hit, metadata = await call(running.stub.GetPost, pb.GetPostRequest(post_id="p07"))
    finally:
        await stop_service(running)
    assert (response.posts_warmed, response.users_warmed) == (12, 1)
    assert hit.post.id == "p07"
    assert metadata["x-cache"] == "hit"


@pytest.mark.parametrize(
    ("warm_setting", "warms"), [({}, True), ({"warm_redis_timeout_ms": 50}, False)], ids=["default", "live"]
)
async def test_a_warm_outlasts_redis_replies_slower_than_the_live_timeout(
    settings: Settings, db_engine: AsyncEngine, warm_setting: dict[str, int], warms: bool
) -> None:
    await _posts(db_engine, 12)
    upstream = urlsplit(settings.redis_url)
    proxy = await TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 6379).start()
    proxied = upstream._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
    running = await start_service(
        settings,
        redis_url=proxied,
        redis_timeout_ms=50,
        warm_batch=5,
        **warm_setting,  # the shipped default, or the live timeout's own value
    )
    try:
        # Every reply 200 ms late, as a child at idle priority on a busy server reads them.
        proxy.latency_s = 0.1
        request = pb.WarmRequest(popular_posts=12, active_users=1)
        if warms:
            response, _ = await call(running.stub.Warm, request)
            assert (response.posts_warmed, response.users_warmed) == (12, 1)
        else:  # the setting is what lets it wait
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await running.stub.Warm(request)
            assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "redis is unreachable" in str(failed.value.details())
    finally:
        await stop_service(running)
        await proxy.close()


async def test_the_worker_stops_with_the_server(settings: Settings, db_engine: AsyncEngine) -> None:
    await _posts(db_engine, 2)
    running = await start_service(settings)
    await call(running.stub.Warm, pb.WarmRequest(popular_posts=2, active_users=1))
    pid = _worker(running).pid
    assert pid is not None
    await stop_service(running)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # joined, so not even a zombie is left


@pytest.fixture
async def held(postgres_only: None, settings: Settings, db_engine: AsyncEngine) -> AsyncIterator[Running]:
    """A service with 20 posts whose first WarmWithProgress, started under posts_locked, waits."""
    await _posts(db_engine, 20)
    running = await start_service(settings, warm_batch=5, **_PATIENT)
    yield running
    await stop_service(running)


def _warm_20(running: Running) -> Any:
    return running.stub.WarmWithProgress(
        pb.WarmWithProgressRequest(warm=pb.WarmRequest(popular_posts=20, active_users=1))
    )


async def _none_waiting(engine: AsyncEngine) -> bool:
    return not await posts_lock_waiters(engine)


async def test_a_cancelled_warm_stops_in_the_child(held: Running, db_engine: AsyncEngine) -> None:
    async with posts_locked(db_engine):
        stream = _warm_20(held)
        await until_async(lambda: posts_lock_waiters(db_engine))  # the child's first query waits
        stream.cancel()
        # The child cancels its warm, and with it the query that waited.
        await until_async(lambda: _none_waiting(db_engine))
    response, _ = await call(held.stub.Warm, pb.WarmRequest(popular_posts=20, active_users=1))
    assert response.posts_warmed == 20, "the worker goes on serving after a cancel"


async def test_a_killed_worker_fails_its_warm_clearly_and_the_next_warm_starts_another(
    held: Running, db_engine: AsyncEngine
) -> None:
    async with posts_locked(db_engine):
        stream = _warm_20(held)
        await until_async(lambda: posts_lock_waiters(db_engine))
        first_pid = _worker(held).pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _report in stream:
                pass
    response, _ = await call(held.stub.Warm, pb.WarmRequest(popular_posts=20, active_users=1))
    second_pid = _worker(held).pid
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "warm worker" in (failed.value.details() or "")
    assert "retry" in (failed.value.details() or "")
    assert response.posts_warmed == 20
    assert second_pid not in (None, first_pid)


def test_only_a_database_another_process_can_open_gets_a_worker() -> None:
    # SQLite in memory would be a different, empty database in the child: such a server warms inline.
    assert not db.shareable("sqlite+aiosqlite:///:memory:")
    assert not db.shareable("sqlite+aiosqlite://")
    assert db.shareable("sqlite+aiosqlite:///./cacheaside.db")
    assert db.shareable("postgresql+asyncpg://localhost/test")


async def test_inline_when_the_setting_says(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"warm_worker": False}))
    try:
        assert isinstance(app.warmer, Warmer)
    finally:
        await app.stop(0)


def test_engine_errors_cross_the_pipe_as_the_status_an_inline_warm_gives() -> None:
    # LoadTimeout and its kind take arguments pickle cannot give back; they cross as ServiceErrors.
    crossed = warm_child._portable(LoadTimeout("post", 0.5))
    assert isinstance(crossed, ServiceError)
    assert (crossed.code, crossed.reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_TIMEOUT")
    assert isinstance(warm_child._portable(DatabaseSaturated(4)), ServiceError)
