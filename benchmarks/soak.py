"""`make soak`: mixed load for minutes while a chaos schedule breaks Redis and PostgreSQL, then checks.

Everything is real and private to the run: a redis-server and a PostgreSQL (initdb'd in a temporary
folder), each behind a TCP proxy the soak controls, and the service in a child process. Readers send
GetPost and BatchGetPosts at about 70% of the capacity measured first; writers commit new versions
of posts straight to PostgreSQL (as other services would) and then call Invalidate. Capacity is what
the service sustains of that same mix in its slowest mode, serving every read from the database while
Redis is away, since the chaos puts it there; the readers then run for a while before the baseline is
taken. The chaos
schedule freezes Redis (SIGSTOP) for 5 s, kills and restarts it, adds 200 ms of latency to Redis and
then to PostgreSQL, cuts the service's PostgreSQL connections, and restarts PostgreSQL. At the end it
prints and checks: failed reads (only UNAVAILABLE while PostgreSQL was down, cut off, or 200 ms slow is
allowed: a key just invalidated has no copy to serve, and a saturated slow database answers its
overflow with UNAVAILABLE rather than queueing), stale reads (a version older than the last one
committed and invalidated before the read began: 0), RSS growth (under 10%), and file descriptors and
sockets back to their baseline, give or take what the configured pools may keep open.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from sqlalchemy import text
from sqlalchemy.engine import make_url

from benchmarks.environment import save_result
from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from client.proto.cacheaside.v1 import cache_service_pb2_grpc as pb_grpc
from server import db
from server.config import Settings
from server.embedded_redis import EmbeddedRedis
from server.migrate import upgrade
from server.seed import SeedCounts, post_id, seed
from tests.private_postgres import PrivatePostgres, private_postgres
from tests.procs import ServerProcess
from tests.tcp_proxy import ProxyMode, TcpProxy

POSTS = 500


@dataclass
class Tally:
    """What the readers and writers saw."""

    reads: int = 0
    failed: list[str] = field(default_factory=list)
    allowed_unavailable: int = 0
    stale: list[str] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    writes: int = 0
    invalidations_retried: int = 0
    database_down: bool = False
    started: float = field(default_factory=time.monotonic)
    # post id -> [(version, monotonic time its invalidation returned)]
    invalidated: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def expected(self, post: str, started: float) -> int:
        """The newest version committed and invalidated before a read that started then."""
        done = [version for version, at in self.invalidated.get(post, []) if at < started]
        return max(done, default=0)


def _version(title: str) -> int:
    return int(title.rsplit("v", 1)[1]) if "v" in title else 0


def _send(stub: Any, rng: random.Random) -> tuple[Any, bool]:
    """One read of the soak's mix: 90% GetPost of a Zipf-like choice, 10% BatchGetPosts of 20."""
    if rng.random() < 0.1:
        ids = [post_id(rng.randrange(POSTS)) for _ in range(20)]
        return stub.BatchGetPosts(pb.BatchGetPostsRequest(post_ids=ids), timeout=10), True
    post = post_id(min(int(rng.paretovariate(1.1)) - 1, POSTS - 1))
    return stub.GetPost(pb.GetPostRequest(post_id=post), timeout=10), False


async def _read_one(stub: Any, tally: Tally, rng: random.Random) -> None:
    started = time.monotonic()
    down = tally.database_down
    try:
        reply, batch = _send(stub, rng)
        response = await reply
        posts = list(response.posts) if batch else [response.post]
        outcome = dict(await reply.trailing_metadata()).get("x-cache", "?")
        tally.outcomes[outcome] = tally.outcomes.get(outcome, 0) + 1
        for found in posts:
            expected = tally.expected(found.id, started)
            if _version(found.title) < expected:
                tally.stale.append(f"{found.id}: read v{_version(found.title)} after v{expected} ({outcome})")
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.UNAVAILABLE and (down or tally.database_down):
            tally.allowed_unavailable += 1
        else:
            tally.failed.append(
                f"{time.monotonic() - tally.started:.1f}s {error.code().name}: {error.details()}"
            )
    tally.reads += 1


async def _readers(stub: Any, tally: Tally, rate_per_s: float, stop: asyncio.Event) -> None:
    rng = random.Random(11)
    pending: set[asyncio.Task[None]] = set()
    interval = 1 / rate_per_s
    next_at = time.monotonic()
    while not stop.is_set():
        task = asyncio.create_task(_read_one(stub, tally, rng))
        pending.add(task)
        task.add_done_callback(pending.discard)
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await asyncio.gather(*pending)


async def _writers(stub: Any, settings: Settings, tally: Tally, stop: asyncio.Event) -> None:
    rng = random.Random(13)
    versions: dict[str, int] = {}
    engine = db.create_engine(settings.model_copy(update={"db_timeout_ms": 2000}))
    try:
        while not stop.is_set():
            await asyncio.sleep(0.1)
            post = post_id(rng.randrange(20))  # the hottest posts, which are surely cached
            version = versions.get(post, 0) + 1
            try:
                async with engine.begin() as connection:
                    await connection.execute(
                        text("UPDATE posts SET title = :title WHERE id = :id"),
                        {"title": f"v{version}", "id": post},
                    )
            except Exception:
                continue  # the database is down: nothing was committed
            versions[post] = version
            tally.writes += 1
            while not stop.is_set():  # the writer's duty: invalidate what it committed
                try:
                    await stub.Invalidate(pb.InvalidateRequest(post_ids=[post]), timeout=5)
                    break
                except grpc.aio.AioRpcError:
                    tally.invalidations_retried += 1
                    await asyncio.sleep(0.1)
            else:
                return
            tally.invalidated.setdefault(post, []).append((version, time.monotonic()))
    finally:
        await engine.dispose()


def _process_figures(pid: int) -> tuple[int, int, int]:
    """RSS in kB, open file descriptors, and sockets among them, of a process."""
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    fds = os.listdir(f"/proc/{pid}/fd")
    sockets = 0
    for fd in fds:
        with contextlib.suppress(OSError):  # closed since the listing
            sockets += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return rss, len(fds), sockets


async def _chaos(
    minutes: float,
    redis_server: EmbeddedRedis,
    redis_proxy: TcpProxy,
    postgres: PrivatePostgres,
    postgres_proxy: TcpProxy,
    tally: Tally,
    log: Callable[[str], None],
) -> None:
    total = minutes * 60
    window = max(2.0, total * 0.05)

    async def freeze_redis() -> None:
        assert redis_server._process is not None
        pid = redis_server._process.pid
        os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(5)
        os.kill(pid, signal.SIGCONT)

    async def kill_redis() -> None:
        redis_server.stop()
        await asyncio.sleep(2)
        await asyncio.to_thread(redis_server.start)

    async def slow(proxy: TcpProxy, database: bool) -> None:
        tally.database_down |= database
        proxy.latency_s = 0.2
        await asyncio.sleep(window)
        proxy.latency_s = 0.0
        await asyncio.sleep(2.5)  # loads queued behind the latency finish or time out
        tally.database_down = False

    async def cut_database_connections() -> None:
        tally.database_down = True
        postgres_proxy.set_mode(ProxyMode.REFUSE)
        await asyncio.sleep(0.5)
        postgres_proxy.set_mode(ProxyMode.FORWARD)
        await asyncio.sleep(1)
        tally.database_down = False

    async def restart_database() -> None:
        tally.database_down = True
        await asyncio.to_thread(postgres.restart)
        await asyncio.sleep(1)
        tally.database_down = False

    schedule: list[tuple[float, str, Callable[[], Awaitable[None]]]] = [
        (0.10, "freeze redis 5 s (SIGSTOP)", freeze_redis),
        (0.22, "kill and restart redis", kill_redis),
        (0.36, "200 ms latency to redis", lambda: slow(redis_proxy, database=False)),
        (0.50, "200 ms latency to postgresql", lambda: slow(postgres_proxy, database=True)),
        (0.64, "cut the service's postgresql connections", cut_database_connections),
        (0.78, "restart postgresql", restart_database),
    ]
    started = time.monotonic()
    for at, name, action in schedule:
        await asyncio.sleep(max(0.0, started + at * total - time.monotonic()))
        log(f"chaos at {time.monotonic() - tally.started:5.1f}s: {name}")
        await action()


async def _capacity(stub: Any, seconds: float = 3.0) -> float:
    """Reads per second of the soak's own mix, from 16 callers that each wait for their answer."""
    done = 0
    deadline = time.monotonic() + seconds

    async def loop(seed: int) -> None:
        nonlocal done
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            await _send(stub, rng)[0]
            done += 1

    await asyncio.gather(*(loop(seed) for seed in range(16)))
    return done / seconds


async def main(argv: list[str] | None = None, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the soak; returns the report (and writes it), with `passed` saying whether every check held."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    args = parser.parse_args(argv)
    with EmbeddedRedis() as redis_server, private_postgres() as postgres:
        redis_proxy = await TcpProxy("127.0.0.1", redis_server.port).start()
        pg_url = make_url(postgres.url)
        postgres_proxy = await TcpProxy("127.0.0.1", pg_url.port or 5432).start()
        direct = Settings(database_url=postgres.url, redis_url=redis_server.url, warm_on_start=False)
        await upgrade(direct)
        engine = db.create_engine(direct)
        await seed(engine, SeedCounts(users=50, posts=POSTS, comments=0), progress=False)
        async with engine.begin() as connection:
            await connection.execute(text("UPDATE posts SET title = 'v0'"))
        await engine.dispose()
        served = direct.model_copy(
            update={
                "database_url": pg_url.set(port=postgres_proxy.port).render_as_string(hide_password=False),
                "redis_url": f"redis://127.0.0.1:{redis_proxy.port}/0",
                "listen": "127.0.0.1:0",
                "auto_invalidate": False,  # the writers invalidate, as the writers do
                "redis_breaker_cooldown_ms": 500,
            }
        )
        server = ServerProcess(served)
        tally = Tally()
        try:
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = pb_grpc.CacheServiceStub(channel)
                hits = await _capacity(stub)
                assert redis_server._process is not None
                os.kill(redis_server._process.pid, signal.SIGSTOP)  # the breaker opens: reads bypass
                try:
                    # A frozen Redis keeps its pub/sub connection, so the near cache serves until its
                    # entries expire: only after that is every read a database read.
                    await _capacity(stub, served.near_cache_ttl_ms / 1000 + 1)
                    bypass = await _capacity(stub)
                finally:
                    os.kill(redis_server._process.pid, signal.SIGCONT)
                capacity = min(hits, bypass)
                rate = 0.7 * capacity
                log(f"capacity {hits:.0f} reads/s from the cache, {bypass:.0f} bypassing it")
                log(f"soaking at {rate:.0f}/s for {args.minutes:g} minutes")
                stop = asyncio.Event()
                work = [
                    asyncio.create_task(_readers(stub, tally, rate, stop)),
                    asyncio.create_task(_writers(stub, direct, tally, stop)),
                ]
                await asyncio.sleep(10)  # steady state before the baseline: pools, caches, arenas
                baseline = _process_figures(server.pid)
                peak_rss = baseline[0]
                tally.started = time.monotonic()
                chaos = asyncio.create_task(
                    _chaos(args.minutes, redis_server, redis_proxy, postgres, postgres_proxy, tally, log)
                )
                ends = time.monotonic() + args.minutes * 60
                while time.monotonic() < ends:
                    await asyncio.sleep(1)
                    peak_rss = max(peak_rss, _process_figures(server.pid)[0])
                await chaos
                stop.set()
                await asyncio.gather(*work)
                await asyncio.sleep(3)  # connections opened for the chaos settle back
                final = _process_figures(server.pid)
        finally:
            server.stop()
            await redis_proxy.close()
            await postgres_proxy.close()
    growth = (final[0] - baseline[0]) / baseline[0]
    # Pools keep what they opened in the chaos, up to their bounds; anything beyond would be a leak.
    pooled = served.db_pool_size + served.redis_max_connections
    checks = {
        "no failed reads": not tally.failed,
        "no stale reads": not tally.stale,
        "rss growth under 10%": growth < 0.10,
        "file descriptors back to baseline (+ pools)": final[1] <= baseline[1] + pooled,
        "sockets back to baseline (+ pools)": final[2] <= baseline[2] + pooled,
    }
    report = {
        "minutes": args.minutes,
        "capacity_per_s": {"hits": round(hits), "bypass": round(bypass)},
        "read_rate_per_s": round(rate),
        "reads": tally.reads,
        "outcomes": tally.outcomes,
        "failed_reads": len(tally.failed),
        "failed_examples": tally.failed[:3] + tally.failed[-3:],
        "unavailable_while_database_down": tally.allowed_unavailable,
        "stale_reads": len(tally.stale),
        "stale_examples": tally.stale[:5],
        "writes": tally.writes,
        "invalidations_retried": tally.invalidations_retried,
        "rss_kb": {"baseline": baseline[0], "peak": peak_rss, "final": final[0], "growth": round(growth, 4)},
        "fds": {"baseline": baseline[1], "final": final[1]},
        "sockets": {"baseline": baseline[2], "final": final[2]},
        "checks": checks,
        "passed": all(checks.values()),
    }
    log(json.dumps({k: v for k, v in report.items() if not k.endswith("examples")}, indent=2))
    for name, held in checks.items():
        log(f"{'ok  ' if held else 'FAIL'} {name}")
    save_result("soak", report)
    return report


if __name__ == "__main__":
    raise SystemExit(0 if asyncio.run(main())["passed"] else 1)
