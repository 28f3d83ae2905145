"""The Python of one near-cache hit, timed alone: the product's GetPost handler, guard and all.

Builds the real app (a SQLite file with a few seeded posts, the machine's Redis or a private one),
takes the GetPost handler the server's generic handler routes a call without an x-request-id to, and
calls it over a stand-in context, so what is timed is the service's own per-call work without
grpc.aio's. After the first near-cache hit the same request is answered whole (near.py's Answers).
Prints the best and the median of 7 runs of 100,000 calls, in microseconds per call; `--profile`
adds cProfile's top functions.

    python -m benchmarks.hot_path [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import pstats
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any

from benchmarks.environment import bench_redis_url
from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server import app as app_module
from server import db
from server.app import run
from server.config import Settings
from server.guard import GuardedService
from server.migrate import upgrade
from server.seed import SeedCounts, post_id, seed
from server.service import SERVICE_NAME

_CALLS = 100_000
_RUNS = 7


@dataclasses.dataclass
class _Details:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


class _Context:
    """What the handlers use of a grpc.aio ServicerContext on the hit path."""

    def __init__(self) -> None:
        self._trailing: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("user-agent", "grpc-python"),)

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._trailing = tuple(metadata)

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing

    def time_remaining(self) -> float | None:
        return None


def _capture_service() -> list[GuardedService]:
    captured: list[GuardedService] = []
    build = app_module._guarded_service

    def capture(*args: Any) -> GuardedService:
        captured.append(build(*args))
        return captured[0]

    app_module._guarded_service = capture  # type: ignore[assignment]
    return captured


async def _measure(redis_url: str, scratch: str, profile: bool) -> None:
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{scratch}/hot.db",
        redis_url=redis_url,
        key_prefix=f"hot-{uuid.uuid4().hex[:8]}",
        listen="127.0.0.1:0",
        warm_on_start=False,
    )
    await upgrade(settings)
    engine = db.create_engine(settings)
    await seed(engine, SeedCounts(users=2, posts=2, comments=0), progress=False)
    await engine.dispose()
    captured = _capture_service()
    app = app_module.create_app(settings)
    await app.start()
    try:
        # Routed as grpc routes a call without an x-request-id, as in the benchmarks.
        routed = captured[0].service(_Details(method=f"/{SERVICE_NAME}/GetPost", invocation_metadata=()))
        assert routed is not None
        handle = routed.unary_unary
        assert handle is not None
        raw = pb.GetPostRequest(post_id=post_id(1)).SerializeToString()
        for _ in range(50):  # a miss fills; the near cache admits once the fill's events are heard
            context = _Context()
            await handle(raw, context)
            if ("x-cache", b"hit") in context.trailing_metadata():
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("the near cache never answered")

        async def calls() -> float:
            started = time.perf_counter()
            for _ in range(_CALLS):
                await handle(raw, _Context())
            return (time.perf_counter() - started) / _CALLS * 1e6

        runs = sorted([await calls() for _ in range(_RUNS)])
        print(f"near-cache hit, handler only: {runs[0]:.2f} us per call (best of {_RUNS}), "
              f"median {statistics.median(runs):.2f}")  # fmt: skip
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            await calls()
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    finally:
        await app.stop(0)


def main(argv: list[str] | None = None) -> int:
    """Time the handler; print the result."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--profile", action="store_true", help="also print cProfile's top functions")
    args = parser.parse_args(argv)
    with bench_redis_url() as redis_url, tempfile.TemporaryDirectory() as scratch:
        run(_measure(redis_url, scratch, args.profile), Settings().event_loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
