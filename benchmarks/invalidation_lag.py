"""Lag from a committed write to its invalidation in Redis, on PostgreSQL's own clock.

A real service with automatic invalidation runs over a PostgreSQL schema of its own; another
connection commits single-row UPDATEs one after another, as other services would, and the outbox
invalidator measures each change's lag from its trigger to the end of its Redis invalidation.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import tempfile
from typing import Any

from sqlalchemy import text

from benchmarks.environment import bench_database, bench_redis_url, bench_settings, save_result
from server import db
from server.app import create_app
from server.seed import SeedCounts, seed


async def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the lag measurement and print its percentiles."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--writes", type=int, default=500)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch, bench_redis_url() as redis_url:
        async with bench_database(scratch) as (database_url, schema):
            if db.is_sqlite(database_url):
                print("invalidation lag: needs PostgreSQL (on SQLite writers call Invalidate); skipped")
                return None
            settings = bench_settings(database_url, schema, redis_url)
            engine = db.create_engine(settings)
            await seed(engine, SeedCounts(users=100, posts=1000, comments=0), progress=False)
            app = create_app(settings)
            await app.start()
            invalidator = app.invalidator
            assert invalidator is not None
            try:
                await asyncio.wait_for(invalidator.caught_up.wait(), 30)
                invalidator.stats.lags_ms.clear()
                for n in range(args.writes):
                    before = invalidator.stats.changes
                    async with engine.begin() as connection:
                        await connection.execute(
                            text("UPDATE posts SET views = views + 1 WHERE id = :id"),
                            {"id": f"p{n % 1000:07d}"},
                        )
                    async with asyncio.timeout(10):
                        while invalidator.stats.changes == before:  # noqa: ASYNC110  (another task's counter)
                            await asyncio.sleep(0.0005)
                stats = invalidator.stats
                report = {
                    "scenario": "commit-to-invalidation lag",
                    "machine": f"{platform.machine()}, Python {platform.python_version()}",
                    "writes": args.writes,
                    "p50_ms": stats.lag_percentile_ms(50),
                    "p99_ms": stats.lag_percentile_ms(99),
                    "max_ms": max(stats.lags_ms),
                }
            finally:
                await app.stop(0)
                await engine.dispose()
    print(f"commit-to-invalidation lag over {args.writes} writes (PostgreSQL outbox, LISTEN/NOTIFY):")
    print(f"p50 {report['p50_ms']:.2f} ms, p99 {report['p99_ms']:.2f} ms, max {report['max_ms']:.2f} ms")
    save_result("invalidation_lag", report)
    return report


if __name__ == "__main__":
    asyncio.run(main())
