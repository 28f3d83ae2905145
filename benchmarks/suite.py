"""`make bench`: the real server under h2load, every scenario interleaved, one table with its ratios.

Seeds 100,000 posts, starts every server configuration once (the product as it ships, pinned to
core 1; the bench-only no-op and sync servers likewise), then runs the scenarios round after round,
so drift on this shared machine spreads over all of them; the load generator runs on core 0. Prints
the machine, the table (medians, min-max) and the ratios; writes suite.json and suite.png to
benchmarks/results/. Then the scenarios with tables of their own run (OTHERS), each as before.

    python -m benchmarks.suite [--duration 5] [--rounds 5] [--scenarios hit,miss]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import select, text

from benchmarks import alternate, chart, h2load, machine, report
from benchmarks.environment import bench_database, bench_redis_url
from benchmarks.keyed_load import write_bodies
from benchmarks.runner import LoadShape, measure
from benchmarks.scenarios import Scenario, Target, request_sequences, scenarios, server_specs
from benchmarks.servers import RunningServer
from client.proto.cacheaside.v1 import cache_service_pb2_grpc as pb_grpc
from server import db
from server.config import Settings
from server.domain.models import posts
from server.embedded_redis import EmbeddedRedis
from server.seed import SeedCounts, seed

RESULTS = Path(__file__).resolve().parent / "results"
# The scenarios with tables of their own, run after the throughput rounds: (name, module with main).
OTHERS = (
    ("hot-key stampede", "benchmarks.stampede"),
    ("invalidation lag", "benchmarks.invalidation_lag"),
    ("near-cache coherence", "benchmarks.near_coherence"),
    ("warm impact", "benchmarks.warm_impact"),
    ("hit against the ceiling, second by second", "benchmarks.alternate"),
)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per run")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each scenario, interleaved")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--streams", type=int, default=4, help="calls in flight per connection")
    parser.add_argument("--posts", type=int, default=100_000, help="posts seeded (the Zipf key space)")
    parser.add_argument("--scenarios", default="", help="comma-separated names (default: all)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--skip-others", action="store_true", help="only the throughput scenarios")
    return parser.parse_args(argv)


async def _popularity(settings: Settings) -> list[str]:
    # Zipf rank 0 is the post Warm picks first: published, most viewed; unpublished posts come last.
    engine = db.create_engine(settings)
    try:
        async with engine.connect() as connection:
            order = posts.c.published.desc(), posts.c.views.desc(), posts.c.id
            return list((await connection.execute(select(posts.c.id).order_by(*order))).scalars())
    finally:
        await engine.dispose()


async def _seed(settings: Settings, count: int) -> None:
    engine = db.create_engine(settings)
    started = time.monotonic()
    try:
        await seed(engine, SeedCounts(users=1000, posts=count, comments=0), progress=False)
        if not db.is_sqlite(settings.database_url):
            # The triggers queued every seeded row for invalidation: nothing is cached yet, and
            # draining 100,000 changes would run in the background of the first rounds.
            async with engine.begin() as connection:
                await connection.execute(text("DELETE FROM cacheaside_changes"))
    finally:
        await engine.dispose()
    print(f"seeded {count:,} posts in {time.monotonic() - started:.0f}s", flush=True)


def _start(names: set[str], specs: dict[str, Any], log_dir: Path) -> dict[str, RunningServer]:
    started = {name: RunningServer(specs[name], log_dir) for name in sorted(names)}
    try:
        for server in started.values():
            server.wait_listening()
    except Exception:
        for server in started.values():
            server.stop()
        raise
    return started


def _blocks(chosen: list[Scenario]) -> list[list[Scenario]]:
    """chosen in its order, cut into blocks run back to back: a scenario of a paired ratio (report.PAIRS)
    grows a chain of its partners at either end, so every pair in it is adjacent (hit-2w-2cpu,
    hit-2w-2cpu-pin, hit, noop); every other scenario is a block of its own."""
    by_name = {scenario.name: scenario for scenario in chosen}
    partners: dict[str, list[str]] = {name: [] for name in by_name}
    for first, second in report.PAIRS:
        if first in by_name and second in by_name:
            partners[first].append(second)
            partners[second].append(first)
    blocks, placed = [], set()
    for scenario in chosen:
        if scenario.name in placed:
            continue
        chain = [scenario.name]
        placed.add(scenario.name)
        for end in (-1, 0):  # grow to the right, then to the left
            while grown := [name for name in partners[chain[end]] if name not in placed]:
                chain.insert(len(chain) if end == -1 else 0, grown[0])
                placed.add(grown[0])
        blocks.append([by_name[name] for name in chain])
    return blocks


def _round_order(blocks: list[list[Scenario]], round_number: int) -> list[Scenario]:
    """One round's runs: the blocks rotated by the round's number, so no scenario always follows the same
    neighbour; a block of paired scenarios runs forwards and then backwards (A B B A), so within the
    round each pair has one run of each order and the drift in between weighs on both alike."""
    rotation = round_number % len(blocks)
    return [
        scenario
        for block in blocks[rotation:] + blocks[:rotation]
        for scenario in (block + block[::-1] if len(block) > 1 else block)
    ]


async def _rounds(
    chosen: list[Scenario],
    servers: dict[str, RunningServer],
    sequences: dict[str, list[bytes]],
    bodies: dict[str, Path],
    args: argparse.Namespace,
) -> dict[str, list[dict[str, Any]]]:
    channels = {name: grpc.aio.insecure_channel(server.target) for name, server in servers.items()}
    stubs = {name: pb_grpc.CacheServiceStub(channel) for name, channel in channels.items()}
    shape = LoadShape(args.duration, args.connections, args.streams)
    runs: dict[str, list[dict[str, Any]]] = {}
    blocks = _blocks(chosen)
    try:
        for round_number in range(args.rounds):
            order = _round_order(blocks, round_number)
            for scenario in order:
                product = stubs.get(scenario.compare_to) if scenario.compare_to else None
                target = Target(stubs[scenario.server], product, sequences)
                run = await measure(scenario, servers[scenario.server], target, bodies, shape)
                run["round"] = round_number
                runs.setdefault(scenario.name, []).append(run)
                print(
                    f"round {round_number + 1}/{args.rounds} {scenario.name:<16} "
                    f"{run['req_per_s']:>8,.0f} req/s  p99 {run['p99_ms']:6.1f} ms",
                    flush=True,
                )
    finally:
        for channel in channels.values():
            await channel.close(None)
    return runs


async def _throughput(args: argparse.Namespace, chosen: list[Scenario], scratch: Path) -> dict[str, Any]:
    with bench_redis_url() as redis_url:
        async with bench_database(str(scratch)) as (database_url, schema):
            found = await machine.describe(
                redis_url=redis_url, database_url=database_url, h2load=h2load.binary()
            )
            print("machine:", machine.one_line(found), flush=True)
            settings = Settings(database_url=database_url, database_schema=schema)
            await _seed(settings, args.posts)
            sequences = request_sequences(await _popularity(settings))
            bodies = {name: scratch / f"{name}.bin" for name in sequences}
            for name, path in bodies.items():
                write_bodies(path, sequences[name])
            env = {
                "CACHEASIDE_DATABASE_URL": database_url,
                "CACHEASIDE_DATABASE_SCHEMA": schema,
                "CACHEASIDE_REDIS_URL": redis_url,
                "CACHEASIDE_WARM_ON_START": "false",
                "CACHEASIDE_WARM_BATCH": "500",
                "CACHEASIDE_WARM_RATE_PER_S": "100000",
                "CACHEASIDE_LOG_FORMAT": "json",
            }
            with EmbeddedRedis() as doomed:
                specs = server_specs(env, uuid.uuid4().hex[:8], doomed.url)
                names = {s.server for s in chosen} | {s.compare_to for s in chosen if s.compare_to}
                servers = _start(names, specs, scratch)
            # The Redis of aio-redis-down is gone now: its reads bypass the cache.
            try:
                runs = await _rounds(chosen, servers, sequences, bodies, args)
            finally:
                for server in servers.values():
                    server.stop()
    found["load_average_at_end"] = [round(load, 2) for load in os.getloadavg()]
    return {"machine": found, "runs": runs, "database": database_url.split(":", 1)[0]}


async def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the suite; returns the report it wrote."""
    args = _arguments(argv)
    try:
        h2load.binary()
    except h2load.H2loadMissing as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from exc
    if shutil.which("taskset") is None:
        raise SystemExit("taskset (util-linux) not found: the suite pins servers to cores with it")
    wanted = set(filter(None, args.scenarios.split(",")))
    chosen = [s for s in scenarios() if not wanted or s.name in wanted]
    if wanted - {s.name for s in chosen}:
        raise SystemExit(f"unknown scenarios: {', '.join(sorted(wanted - {s.name for s in chosen}))}")
    with tempfile.TemporaryDirectory() as scratch:
        measured = await _throughput(args, chosen, Path(scratch))
    summary = {name: report.summarize(runs) for name, runs in measured["runs"].items()}
    result: dict[str, Any] = {
        "command": "make bench (python -m benchmarks.suite " + " ".join(argv or sys.argv[1:]) + ")",
        "machine": measured["machine"],
        "load": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "connections": args.connections,
            "streams_per_connection": args.streams,
            "posts": args.posts,
            "server_cpu": "1 (taskset), load generator on 0",
        },
        "scenarios": {s.name: {"server": s.server, "what": s.what} | summary[s.name] for s in chosen},
        "ratios": report.ratios(summary),
    }
    _write(result, chosen, summary, args.results_dir)  # kept even if a scenario below fails
    _print(result, chosen, summary)
    if not args.skip_others:
        for name, module_name in OTHERS:
            scenario = importlib.import_module(module_name)
            result[module_name.rsplit(".", 1)[1]] = await _guarded(name, scenario.main([]))
    _print_others(result)
    _write(result, chosen, summary, args.results_dir)
    return result


async def _guarded(name: str, scenario: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    try:
        return await scenario
    except Exception as exc:  # reported in the table's notes and the JSON, not fatal to the suite
        print(f"WARNING: the {name} scenario failed: {exc!r}", flush=True)
        return {"error": repr(exc)}


def _write(result: dict[str, Any], chosen: list[Scenario], summary: dict[str, Any], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "suite.json").write_text(json.dumps(result, indent=2) + "\n")
    title = f"cacheaside make bench: {machine.one_line(result['machine'])}"
    chart.draw(directory / "suite.png", [s.name for s in chosen], summary, title)


def _print(result: dict[str, Any], chosen: list[Scenario], summary: dict[str, Any]) -> None:
    load = result["load"]
    print()
    print("machine:", machine.one_line(result["machine"]))
    print(
        f"load: {load['connections']} connections x {load['streams_per_connection']} streams, "
        f"{load['rounds']} interleaved runs of {load['duration_s']:g}s per scenario; "
        f"server on core 1, load generator on core 0; {load['posts']:,} posts"
    )
    print(report.table(chosen, summary))
    print(report.ratio_lines(result["ratios"]))
    for problem in report.problems(summary, in_flight=load["connections"] * load["streams_per_connection"]):
        print("failed calls:", problem)


def _print_others(result: dict[str, Any]) -> None:
    stampede = result.get("stampede", {})
    if "loads_per_expiry" in stampede:
        loads = stampede["loads_per_expiry"]
        print(
            f"- hot-key stampede: {loads['leases']['median']:g} database loads per expiry with leases, "
            f"{loads['no leases']['median']:g} without"
        )
    for key, what in (
        ("invalidation_lag", "commit-to-invalidation lag"),
        ("near_coherence", "near-cache delay"),
    ):
        if "p99_ms" in result.get(key, {}):
            print(f"- {what}: p50 {result[key]['p50_ms']:.1f} ms, p99 {result[key]['p99_ms']:.1f} ms")
    alternated = result.get("alternate", {}).get("ratios", {})
    for name, ratio in alternated.items():
        print(
            f"- {alternate.LABELS[name]}, alternated second by second: {report.ratio_text(ratio['median'])}x "
            f"median of {result['alternate']['rounds']} rounds "
            f"(quartiles {report.ratio_text(ratio['q1'])}-{report.ratio_text(ratio['q3'])})"
        )
    warm = result.get("warm_impact", {})
    if "ratio_p99_warm_to_no_warm" in warm:
        ratio = warm["ratio_p99_warm_to_no_warm"]
        failed = f", {warm['failed_reads']} reads failed" if warm.get("failed_reads") else ""
        print(f"- live reads' p99 during a warm of 10,000 keys / without: {ratio:.2f}{failed}")


if __name__ == "__main__":
    asyncio.run(main())
