"""The command line: migrations, deterministic seeding, calls, and `serve --demo` with a private Redis."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from server.domain.models import posts, users
from server.embedded_redis import free_port
from server.seed import SeedCounts, seed
from tests.conftest import Running
from tests.data import add_post, add_user

CLI = [sys.executable, "-m", "client.cli"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, env=env, check=False)


async def _run_async(*args: str) -> tuple[int, str, str]:
    # The server runs in this test's event loop, so the CLI must not block it.
    process = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    return int(process.returncode or 0), out.decode(), err.decode()


async def _snapshot(engine: AsyncEngine) -> list[tuple[object, ...]]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(posts.c.id, posts.c.author_id, posts.c.views).order_by(posts.c.id)
        )
        return [tuple(row) for row in rows]


async def test_seed_is_deterministic_and_batched(db_engine: AsyncEngine) -> None:
    counts = SeedCounts(users=50, posts=12_000, comments=300)  # more posts than one batch
    await seed(db_engine, counts, progress=False)
    first = await _snapshot(db_engine)
    async with db_engine.connect() as connection:
        assert (await connection.execute(select(func.count()).select_from(users))).scalar_one() == 50
    assert len(first) == 12_000

    async with db_engine.begin() as connection:
        await connection.execute(posts.delete())
    await seed(db_engine, counts, progress=False)  # users exist already: kept, not duplicated
    assert await _snapshot(db_engine) == first


async def test_cli_calls_print_the_answer_and_its_cache_outcome(
    service: Running, db_engine: AsyncEngine
) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice", title="Hello")
    code, out, err = await _run_async("get-post", "p1", "--target", service.target)
    assert code == 0, err
    assert "x-cache: miss" in out
    assert 'title: "Hello"' in out
    _, out, _ = await _run_async("get-post", "p1", "--target", service.target, "--json")
    assert '"cache": "hit"' in out
    assert '"title": "Hello"' in out
    code, _, err = await _run_async("get-post", "nope", "--target", service.target)
    assert code == 1
    assert "NOT_FOUND" in err
    assert "(request id " in err, "a failed call names its request id, to find it in the server's log"


async def test_output_cut_short_by_its_reader_ends_the_cli_quietly(
    service: Running, db_engine: AsyncEngine
) -> None:
    # `cacheaside get-post p1 | head -1`, with the reader gone before the CLI writes: no traceback.
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice", title="Hello")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        process = await asyncio.create_subprocess_exec(
            *CLI,
            "get-post",
            "p1",
            "--target",
            service.target,
            stdout=write_end,
            stderr=asyncio.subprocess.PIPE,
        )
    finally:
        os.close(write_end)
    _, err = await process.communicate()
    assert (process.returncode, err.decode()) == (128 + signal.SIGPIPE, "")


def test_db_upgrade_then_serve_demo_with_a_private_redis(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "CACHEASIDE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/demo.db",
        "CACHEASIDE_LISTEN": f"127.0.0.1:{port}",
    }
    env.pop("CACHEASIDE_REDIS_URL", None)
    upgraded = _run("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr

    server = subprocess.Popen([*CLI, "serve", "--demo"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        answer = None
        while time.monotonic() < deadline:
            answer = _run("get-post", "p0000001", "--target", f"127.0.0.1:{port}", "--timeout", "2")
            if answer.returncode == 0:
                break
            time.sleep(0.2)
        assert answer is not None
        assert answer.returncode == 0, answer.stderr
        assert 'id: "p0000001"' in answer.stdout
        again = _run("get-post", "p0000001", "--target", f"127.0.0.1:{port}")
        assert "x-cache: hit" in again.stdout, "the demo caches for real"
    finally:
        server.send_signal(signal.SIGTERM)
        _, log = server.communicate(timeout=30)
    assert server.returncode == 0, log
    assert "started a private redis-server" in log
    private = re.search(r"private redis-server at redis://127\.0\.0\.1:(\d+)", log)
    assert private, log
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", int(private.group(1)))) != 0, (
            "the private redis stops with the service"
        )
