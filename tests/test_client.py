"""CacheClient and AsyncCacheClient: typed calls, metadata, deadline, retries; the CLI's health and stats."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time

import grpc
import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from client.client import CACHE_DEBUG_METADATA, GET_POST, AsyncCacheClient, CacheClient
from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server.config import Settings
from tests.conftest import Database, Running, start_service, stop_service
from tests.data import add_comment, add_post, add_user

CLI = [sys.executable, "-m", "client.cli"]


async def _seed(engine: AsyncEngine) -> None:
    await add_user(engine, "alice")
    await add_post(engine, "p1", "alice", title="one", views=5)
    await add_post(engine, "p2", "alice", title="two", archived=True, published=False)
    await add_comment(engine, "c1", "p1", "alice")


def _sync_calls(target: str) -> dict[str, object]:
    with CacheClient(target) as client:
        reply = client.call(GET_POST, pb.GetPostRequest(post_id="p1"), metadata=CACHE_DEBUG_METADATA)
        return {
            "user": client.get_user("alice", full=True),
            "post": client.get_post("p1"),
            "trending": client.get_trending(limit=5),
            "archived": client.get_archived(),
            "posts_by_author": client.list_posts_by_author("alice"),
            "comments_by_author": client.list_comments_by_author("alice"),
            "users": client.batch_get_users(["alice", "alice"]),
            "posts": client.batch_get_posts(["p2", "p1"]),
            "invalidated": client.invalidate(post_ids=["p1"]),
            "warmed": client.warm(posts=1, users=1, active_within_s=3600),
            "health": client.health(),
            "reply": reply,
        }


async def test_the_blocking_client_returns_typed_messages_and_metadata(
    service: Running, db_engine: AsyncEngine
) -> None:
    await _seed(db_engine)
    # The server runs on this event loop, so the blocking client runs on a thread.
    got = await asyncio.to_thread(_sync_calls, service.target)
    assert isinstance(got["user"], pb.GetUserResponse)
    assert got["user"].user.settings.theme == "dark"
    assert got["post"].post.title == "one"
    assert [p.id for p in got["trending"].posts] == ["p1"]
    assert [p.id for p in got["archived"].posts] == ["p2"]
    assert [p.id for p in got["posts_by_author"].posts] == ["p2", "p1"] or len(
        got["posts_by_author"].posts
    ) == 2
    assert [c.id for c in got["comments_by_author"].comments] == ["c1"]
    assert [u.id for u in got["users"].users] == ["alice", "alice"]
    assert [p.id for p in got["posts"].posts] == ["p2", "p1"]
    assert got["invalidated"].keys_invalidated >= 1
    assert (got["warmed"].posts_warmed, got["warmed"].users_warmed) == (1, 1)
    assert got["health"] == 1  # SERVING
    reply = got["reply"]
    assert reply.response.post.id == "p1"
    assert (reply.cache, reply.tier) == ("miss", "warm")
    assert reply.request_id is None, "none sent, and the call succeeded"


async def test_the_asyncio_client_returns_typed_messages(service: Running, db_engine: AsyncEngine) -> None:
    await _seed(db_engine)
    async with AsyncCacheClient(service.target) as client:
        assert (await client.get_post("p1")).post.title == "one"
        reply = await client.call(
            GET_POST, pb.GetPostRequest(post_id="p1"), metadata=(("x-request-id", "abc"),)
        )
        assert (reply.cache, reply.request_id) == ("hit", "abc")
        assert (await client.get_user("alice")).user.HasField("profile") is False
        assert [p.id for p in (await client.batch_get_posts(["p1"])).posts] == ["p1"]
        assert len((await client.list_comments_by_author("alice", limit=1)).comments) == 1
        assert (await client.invalidate(user_ids=["alice"])).keys_invalidated >= 1
        before = (await client.invalidate(tags=["post_lists"])).generation
        assert (await client.invalidate(everything=True)).generation == before + 1
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.get_post("nope")
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_unavailable_is_retried_with_backoff_through_the_service_config(
    settings: Settings, database: Database, tmp_path: os.PathLike[str]
) -> None:
    running = await start_service(settings, database_url=f"sqlite+aiosqlite:///{tmp_path}/missing/none.db")
    unavailable = running.app.metrics.rpc_requests.labels("GetPost", "UNAVAILABLE")
    try:
        for attempts in (4, 1):
            before = unavailable.value
            async with AsyncCacheClient(running.target, max_attempts=attempts) as client:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await client.get_post("p1")
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert unavailable.value - before == attempts, "one call, that many attempts at the server"
    finally:
        await stop_service(running)


async def test_every_call_has_a_default_deadline() -> None:
    # A listener that accepts connections and never answers: only the deadline ends the call.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        async with AsyncCacheClient(target, timeout_s=0.3) as client:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await client.get_post("p1")
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5


async def _cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    return int(process.returncode or 0), out.decode(), err.decode()


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_cli_health_stats_and_token(settings: Settings, db_engine: AsyncEngine) -> None:
    await _seed(db_engine)
    running = await start_service(settings, metrics_listen="127.0.0.1:0", admin_token=SecretStr("tok-1"))
    assert running.app.metrics_server is not None
    metrics_url = f"http://127.0.0.1:{running.app.metrics_server.port}/metrics"
    try:
        assert await _cli("health", "--target", running.target) == (0, "SERVING\n", "")
        code, out, _ = await _cli("health", "--target", running.target, "--service", "nope", "--json")
        assert code == 1
        assert json.loads(out)["status"].startswith("NOT_FOUND")

        assert (await _cli("get-post", "p1", "--target", running.target))[0] == 0
        assert (await _cli("get-post", "p1", "--target", running.target))[0] == 0
        code, _, err = await _cli("invalidate", "--post", "p1", "--target", running.target)
        assert (code, "UNAUTHENTICATED" in err) == (1, True)
        assert (await _cli("invalidate", "--post", "p1", "--target", running.target, "--token", "tok-1"))[
            0
        ] == 0

        code, out, err = await _cli("stats", "--metrics-url", metrics_url)
        assert code == 0, err
        assert "hit ratio 50.0%  (hit 1, miss 1, bypass 0)" in out
        assert "invalidations: 1 calls" in out
        code, out, _ = await _cli("stats", "--metrics-url", metrics_url, "--json")
        summary = json.loads(out)
        assert summary["requests"]["Invalidate"] == {"OK": 1, "UNAUTHENTICATED": 1}
        assert summary["cache"]["by_rpc"]["GetPost"] == {"hit": 1, "miss": 1}
        assert summary["database"]["up"] is True
    finally:
        await stop_service(running)
    code, _, err = await _cli("stats", "--metrics-url", metrics_url)
    assert code == 1
    assert "cannot read" in err
