"""Database loads per expiry of a hot key under concurrent callers, with and without leases.

Four service processes share one Redis and one database. Each round deletes the hot key, as its expiry would,
and fires the callers at once through gRPC. The baseline is the same code with CACHEASIDE_LEASES=false:
the seed's plain cache-aside, where every miss loads. Prints medians with min-max, and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import tempfile
import uuid
from typing import Any

import grpc
import redis.asyncio as aioredis

from benchmarks.environment import bench_database, bench_redis_url, bench_settings, save_result, seed_database
from benchmarks.stats import spread
from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from client.proto.cacheaside.v1 import cache_service_pb2_grpc as pb_grpc
from server.config import Settings
from server.domain.keys import key_prefix
from server.seed import SeedCounts
from tests.procs import ServerProcess


async def _round(
    processes: list[ServerProcess], stubs: list[Any], redis: aioredis.Redis, key: str, callers: int
) -> int:
    await redis.delete(key)  # the hot key expires
    before = sum(process.stats()["loads"] for process in processes)
    calls = [
        stubs[n % len(stubs)].GetPost(pb.GetPostRequest(post_id="p0000000"), timeout=30)
        for n in range(callers)
    ]
    await asyncio.gather(*calls)
    return sum(process.stats()["loads"] for process in processes) - before


async def _measure(
    base: Settings, *, leases: bool, instances: int, callers: int, rounds: int, load_ms: float
) -> list[int]:
    # No load slots in either mode: the baseline is the seed's cache-aside, where every miss loads, and
    # slots would refuse the herd's loads instead of counting them.
    update = {"leases": leases, "max_concurrent_loads": 0, "key_prefix": f"bench-{uuid.uuid4().hex[:8]}"}
    settings = base.model_copy(update=update)
    processes = [ServerProcess(settings, extra_load_ms=load_ms) for _ in range(instances)]
    channels = [grpc.aio.insecure_channel(process.target) for process in processes]
    stubs = [pb_grpc.CacheServiceStub(channel) for channel in channels]
    redis = aioredis.Redis.from_url(settings.redis_url)
    key = key_prefix(settings.key_prefix) + "post:p0000000"
    try:
        await asyncio.gather(
            *(stub.GetPost(pb.GetPostRequest(post_id="p0000000")) for stub in stubs)
        )  # warm up
        return [await _round(processes, stubs, redis, key, callers) for _ in range(rounds)]
    finally:
        await redis.delete(key)
        await redis.aclose()
        for channel in channels:
            await channel.close()
        for process in processes:
            process.stop()


async def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the stampede scenario and print its table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--callers", type=int, default=200)
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--load-ms", type=float, default=100.0, help="cost added to each load, as a heavy query would take"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch, bench_redis_url() as redis_url:
        async with bench_database(scratch) as (database_url, schema):
            base = bench_settings(database_url, schema, redis_url, max_stale_s=0)
            await seed_database(base, SeedCounts(users=10, posts=10, comments=0))
            results: dict[str, list[int]] = {}
            for leases in (True, False, True, False):  # interleaved against drift
                name = "leases" if leases else "no leases"
                results.setdefault(name, []).extend(
                    await _measure(
                        base,
                        leases=leases,
                        instances=args.instances,
                        callers=args.callers,
                        rounds=args.rounds,
                        load_ms=args.load_ms,
                    )
                )
    summary = {name: spread(values) for name, values in results.items()}
    ratio = summary["no leases"]["median"] / max(summary["leases"]["median"], 1)
    report = {
        "scenario": "hot-key stampede",
        "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
        "database": database_url.split(":", 1)[0],
        "instances": args.instances,
        "callers_per_expiry": args.callers,
        "added_load_ms": args.load_ms,
        "expiries": len(results["leases"]),
        "loads_per_expiry": summary,
        "ratio_no_leases_to_leases": ratio,
    }
    print(
        f"hot-key stampede: {args.callers} concurrent callers over {args.instances} instances, "
        f"{report['database']}, each load taking {args.load_ms:g} ms more"
    )
    print(f"{'mode':<10} {'loads/expiry median':>20} {'min-max':>10}")
    for name, values in summary.items():
        print(f"{name:<10} {values['median']:>20.1f} {values['min']:>4}-{values['max']:<5}")
    print(f"ratio: without leases {ratio:.0f}x the database loads of with leases (target: <= 1 with leases)")
    save_result("stampede", report)
    return report


if __name__ == "__main__":
    asyncio.run(main())
