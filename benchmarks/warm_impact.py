"""Live read latency while a warm of 10,000 keys runs, against the same reads with no warm.

One server process over PostgreSQL (or SQLite) and Redis. An open-loop reader sends cache hits on an
already cached working set at a fixed rate (a third of what this server does flat out), whether or
not earlier ones have answered, as live traffic would; latency is measured at the client. Phases
alternate (warm, no warm, warm, no warm) and each quiet phase lasts as long as the warm before it.
Prints p50 and p99 per phase and the ratio of the p99s; target <= 1.2.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import random
import statistics
import tempfile
import time
from collections import Counter
from typing import Any

import grpc

from benchmarks.environment import bench_database, bench_redis_url, bench_settings, save_result
from benchmarks.stats import percentile
from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from client.proto.cacheaside.v1 import cache_service_pb2_grpc as pb_grpc
from server import db
from server.config import Settings
from server.seed import SeedCounts, post_id, seed
from tests.procs import ServerProcess

SERVER_CPU, READER_CPU = 1, 0  # the suite's choice; the warm worker runs wherever a core idles


async def _readers(
    stub: Any, keys: list[str], rate_per_s: float, stop: asyncio.Event
) -> tuple[list[float], Counter[str]]:
    """Open-loop reads until stop: the latencies of those answered, and the failed ones by status (a
    failed read is counted and shown, never left out of the figures unseen)."""
    latencies: list[float] = []
    failed: Counter[str] = Counter()
    rng = random.Random(7)
    in_flight: set[asyncio.Task[None]] = set()

    async def read(key: str) -> None:
        started = time.perf_counter()
        try:
            await stub.GetPost(pb.GetPostRequest(post_id=key), timeout=10)
        except grpc.aio.AioRpcError as exc:
            failed[exc.code().name] += 1
            return
        latencies.append((time.perf_counter() - started) * 1000)

    interval = 1 / rate_per_s
    next_at = time.perf_counter()
    try:
        while not stop.is_set():
            task = asyncio.create_task(read(rng.choice(keys)))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        await asyncio.gather(*in_flight)
    finally:  # stopped by a failed warm: no read is left to fail on a closed channel, unheard
        left = list(in_flight)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
    return latencies, failed


async def _phase(
    stub: Any, keys: list[str], concurrency: int, *, warm: int, quiet_s: float
) -> dict[str, Any]:
    stop = asyncio.Event()
    readers = asyncio.create_task(_readers(stub, keys, concurrency, stop))
    started = time.perf_counter()
    try:
        if warm:
            response = await stub.Warm(pb.WarmRequest(popular_posts=warm, active_users=1), timeout=600)
            assert response.posts_warmed > 0.9 * warm, response
        else:
            await asyncio.sleep(quiet_s)
    except BaseException:
        readers.cancel()
        await asyncio.gather(readers, return_exceptions=True)
        raise
    stop.set()
    latencies, failed = await readers
    return {
        "warm_keys": warm,
        "seconds": time.perf_counter() - started,
        "reads": len(latencies),
        "failed": dict(failed),
        "p50_ms": percentile(sorted(latencies), 50),
        "p99_ms": percentile(sorted(latencies), 99),
    }


async def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the warm-impact scenario and print its table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--warm-keys", type=int, default=10_000)
    parser.add_argument("--read-rate", type=float, default=1000, help="live reads sent per second")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=None, help="CACHEASIDE_WARM_BATCH for this run")
    parser.add_argument("--rate", type=float, default=None, help="CACHEASIDE_WARM_RATE_PER_S for this run")
    parser.add_argument("--concurrency", type=int, default=None, help="CACHEASIDE_WARM_CONCURRENCY")
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false", help="leave the server and reader unpinned"
    )
    parser.add_argument("--set", action="append", default=[], help="another setting for this run: name=value")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch, bench_redis_url() as redis_url:
        async with bench_database(scratch) as (database_url, schema):
            settings = bench_settings(database_url, schema, redis_url, auto_invalidate=False)
            overrides = {
                "warm_batch": args.batch,
                "warm_rate_per_s": args.rate,
                "warm_concurrency": args.concurrency,
            }
            chosen = {k: v for k, v in overrides.items() if v is not None}
            chosen |= dict(item.split("=", 1) for item in args.set)
            settings = Settings(**{**settings.model_dump(), **chosen})  # validated, as from the environment
            engine = db.create_engine(settings)
            await seed(
                engine, SeedCounts(users=1000, posts=int(args.warm_keys * 1.25), comments=0), progress=False
            )
            await engine.dispose()
            server = ServerProcess(settings)
            if args.pin:
                # As in the suite: the server and this reader each on a core of their own, so the
                # figures measure warming, not two processes fighting over one core.
                os.sched_setaffinity(server.pid, {SERVER_CPU})
                os.sched_setaffinity(0, {READER_CPU})
            try:
                async with grpc.aio.insecure_channel(server.target) as channel:
                    stub = pb_grpc.CacheServiceStub(channel)
                    working_set = [post_id(n) for n in range(0, 2000, 4)]
                    await stub.BatchGetPosts(pb.BatchGetPostsRequest(post_ids=working_set[:100]))
                    for start in range(100, len(working_set), 100):
                        await stub.BatchGetPosts(
                            pb.BatchGetPostsRequest(post_ids=working_set[start : start + 100])
                        )
                    # The reader's own collector must not stall it mid-measurement, as the server's
                    # does not (freeze_startup_heap): a pause here would be charged to the server.
                    gc.collect()
                    gc.freeze()
                    # The warm worker starts with the first warm (or the startup warm): not measured.
                    await stub.Warm(pb.WarmRequest(popular_posts=1, active_users=1), timeout=60)
                    await _phase(stub, working_set, args.read_rate, warm=0, quiet_s=1.0)  # settle
                    phases = []
                    for _ in range(args.rounds):
                        warm = await _phase(stub, working_set, args.read_rate, warm=args.warm_keys, quiet_s=0)
                        quiet = await _phase(
                            stub, working_set, args.read_rate, warm=0, quiet_s=warm["seconds"]
                        )
                        phases += [quiet, warm]
            finally:
                server.stop()
    quiet_p99 = statistics.median(p["p99_ms"] for p in phases if not p["warm_keys"])
    warm_p99 = statistics.median(p["p99_ms"] for p in phases if p["warm_keys"])
    report = {
        "scenario": "live reads during a warm",
        "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
        "database": database_url.split(":", 1)[0],
        "warming": "in a worker process at idle priority" if settings.warm_worker else "inline",
        "phases": phases,
        "p99_ms_no_warm": quiet_p99,
        "p99_ms_warm": warm_p99,
        "ratio_p99_warm_to_no_warm": warm_p99 / quiet_p99,
        "failed_reads": sum(sum(p["failed"].values()) for p in phases),
    }
    print(
        f"live reads during a warm of {args.warm_keys} keys ({args.read_rate:g}/s, {report['database']}; "
        f"warming {report['warming']})"
    )
    print(f"{'phase':<8} {'seconds':>8} {'reads':>8} {'p50 ms':>8} {'p99 ms':>8}  failed reads")
    for phase in phases:
        name = "warm" if phase["warm_keys"] else "no warm"
        seconds, reads, p50, p99 = phase["seconds"], phase["reads"], phase["p50_ms"], phase["p99_ms"]
        failed = ", ".join(f"{count} {code}" for code, count in sorted(phase["failed"].items())) or "0"
        print(f"{name:<8} {seconds:>8.1f} {reads:>8} {p50:>8.2f} {p99:>8.2f}  {failed}")
    ratio = report["ratio_p99_warm_to_no_warm"]
    print(
        f"ratio: p99 during warm / p99 without = {ratio:.2f} (median of {args.rounds} rounds; target <= 1.20)"
    )
    if report["failed_reads"]:
        print(f"failed reads: {report['failed_reads']} (not in the latencies; by phase above)")
    save_result("warm_impact", report)
    return report


if __name__ == "__main__":
    asyncio.run(main())
