"""How soon another process's near cache forgets a key after Invalidate: the coherence delay.

Two server processes share Redis and the database. Each round, the reader process reads a key until
its near cache holds it; the bench then calls Invalidate on the writer process and polls the reader's
counters until its near cache has dropped the key. The delay runs from the Invalidate call to the
drop, so it includes the call itself. Prints p50, p99 and max; target p99 <= 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import tempfile
import time
from typing import Any

import grpc

from benchmarks.environment import bench_database, bench_redis_url, bench_settings, save_result, seed_database
from benchmarks.stats import percentile
from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from client.proto.cacheaside.v1 import cache_service_pb2_grpc as pb_grpc
from server.seed import SeedCounts, post_id
from tests.procs import ServerProcess


async def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure the coherence delay and print its percentiles."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    delays: list[float] = []
    with tempfile.TemporaryDirectory() as scratch, bench_redis_url() as redis_url:
        async with bench_database(scratch) as (database_url, schema):
            settings = bench_settings(database_url, schema, redis_url, auto_invalidate=False)
            await seed_database(settings, SeedCounts(users=10, posts=100, comments=0))
            reader, writer = ServerProcess(settings), ServerProcess(settings)
            try:
                async with (
                    grpc.aio.insecure_channel(reader.target) as reader_channel,
                    grpc.aio.insecure_channel(writer.target) as writer_channel,
                ):
                    reads = pb_grpc.CacheServiceStub(reader_channel)
                    writes = pb_grpc.CacheServiceStub(writer_channel)
                    for n in range(args.rounds):
                        key = post_id(n % 100)
                        for _ in range(3):  # the second read admits it to the near cache
                            await reads.GetPost(pb.GetPostRequest(post_id=key))
                        dropped = reader.stats()["near"]["dropped"]
                        started = time.perf_counter()
                        await writes.Invalidate(pb.InvalidateRequest(post_ids=[key]))
                        async with asyncio.timeout(5):
                            while reader.stats()["near"]["dropped"] == dropped:  # noqa: ASYNC110
                                await asyncio.sleep(0)
                        delays.append((time.perf_counter() - started) * 1000)
            finally:
                reader.stop()
                writer.stop()
    report = {
        "scenario": "near-cache coherence delay",
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "rounds": args.rounds,
        "p50_ms": percentile(sorted(delays), 50),
        "p99_ms": percentile(sorted(delays), 99),
        "max_ms": max(delays),
    }
    print(f"near-cache coherence: Invalidate on one process to the drop in another, {args.rounds} rounds:")
    print(f"p50 {report['p50_ms']:.2f} ms, p99 {report['p99_ms']:.2f} ms, max {report['max_ms']:.2f} ms")
    save_result("near_coherence", report)
    return report


if __name__ == "__main__":
    asyncio.run(main())
