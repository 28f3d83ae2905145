"""Read statuses while Redis freezes: grpc core's overload shedding (CANCELLED), in a minute and alone.

One server process over PostgreSQL (or SQLite) and a private redis-server. Reads (90% GetPost over a
Zipf-like choice, 10% BatchGetPosts of 20) run open loop at --rate, or closed loop with --readers;
Redis is frozen (SIGSTOP) for 5 s, --rounds times. Prints the status codes the reader saw. A frozen
Redis means bypass, never a failed read, as long as the rate is within what the process can serve from
the database (about 1,100 reads/s on the 2-core machine: `--rate 700` is all OK). The default 1,800/s
is past it on purpose: calls queue in grpc core, which sheds them with CANCELLED (README, "Every
resource has a bound").
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import signal
import tempfile
from typing import Any

import grpc

from benchmarks.environment import bench_database, bench_settings, seed_database
from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from client.proto.cacheaside.v1 import cache_service_pb2_grpc as pb_grpc
from server.embedded_redis import EmbeddedRedis
from server.seed import SeedCounts, post_id
from tests.procs import ServerProcess

POSTS = 2000


async def _read(stub: Any, rng: random.Random, codes: collections.Counter[str]) -> None:
    try:
        if rng.random() < 0.1:
            ids = [post_id(rng.randrange(POSTS)) for _ in range(20)]
            await stub.BatchGetPosts(pb.BatchGetPostsRequest(post_ids=ids), timeout=10)
        else:
            post = post_id(min(int(rng.paretovariate(1.1)) - 1, POSTS - 1))
            await stub.GetPost(pb.GetPostRequest(post_id=post), timeout=10)
        codes["OK"] += 1
    except grpc.aio.AioRpcError as error:
        codes[f"{error.code().name}: {error.details()}"[:100]] += 1


async def _open_loop(stub: Any, rate: float, stop: asyncio.Event, codes: collections.Counter[str]) -> None:
    rng, pending = random.Random(1), set()
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while not stop.is_set():
        task = asyncio.create_task(_read(stub, rng, codes))
        pending.add(task)
        task.add_done_callback(pending.discard)
        next_at += 1 / rate
        await asyncio.sleep(max(0.0, next_at - loop.time()))
    await asyncio.gather(*pending)


async def _closed_loop(stub: Any, seed: int, stop: asyncio.Event, codes: collections.Counter[str]) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        await _read(stub, rng, codes)


async def main(argv: list[str] | None = None) -> collections.Counter[str]:
    """Run the freezes and print the statuses."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=1800, help="open-loop reads per second")
    parser.add_argument("--readers", type=int, default=0, help="closed-loop readers instead of --rate")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    codes: collections.Counter[str] = collections.Counter()
    with tempfile.TemporaryDirectory() as scratch, EmbeddedRedis() as redis:
        async with bench_database(scratch) as (database_url, schema):
            settings = bench_settings(
                database_url, schema, redis.url, auto_invalidate=False, redis_breaker_cooldown_ms=500
            )
            await seed_database(settings, SeedCounts(users=100, posts=POSTS, comments=0))
            server = ServerProcess(settings)
            stop = asyncio.Event()
            try:
                async with grpc.aio.insecure_channel(server.target) as channel:
                    stub = pb_grpc.CacheServiceStub(channel)
                    if args.readers:
                        work = [_closed_loop(stub, n, stop, codes) for n in range(args.readers)]
                    else:
                        work = [_open_loop(stub, args.rate, stop, codes)]
                    tasks = [asyncio.create_task(job) for job in work]
                    await asyncio.sleep(3)
                    pid = redis.pid
                    for round_number in range(args.rounds):
                        os.kill(pid, signal.SIGSTOP)
                        await asyncio.sleep(5)
                        os.kill(pid, signal.SIGCONT)
                        await asyncio.sleep(3)
                        print(f"after freeze {round_number + 1}: {dict(codes)}", flush=True)
                    stop.set()
                    await asyncio.gather(*tasks)
            finally:
                server.stop()
    return codes


if __name__ == "__main__":
    asyncio.run(main())
