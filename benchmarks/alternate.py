"""The hit, a bare dictionary hit and the no-op ceiling, alternated second by second: ratios that a
noisy host's drift cannot bias.

On a shared virtual machine the speed of a core moves by 2x within seconds (session 10's host gave the
same no-op server 3,000 and 6,600 req/s in consecutive 2 s runs), so two scenarios measured 5 s or more
apart, as the suite's rounds measure them, may be measured on two different machines. Here three
servers run side by side on the server's core: the product as it ships (a near-cache hit, its answer
held whole), `benchmarks/aio_server.py --mode near` (parse, one dictionary lookup, frame: the least a
near-cache hit can do) and `--mode noop` (the ceiling). h2load drives each in turn for `--duration`
seconds, round after round, the order rotating through all six so that each server runs before and
after each other equally often. A round's ratios compare runs a second apart; the report gives their
median over the rounds with quartiles, and the ratio of the summed req/s. Prints the machine and the
ratios; writes benchmarks/results/alternate.json.

    python -m benchmarks.alternate [--rounds 30] [--duration 1]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import h2load, machine, report
from benchmarks.environment import bench_redis_url, save_result
from benchmarks.runner import server_failures
from benchmarks.scenarios import GET_POST, HIT_REQUEST, LOAD_CPU, LOOP, SERVER_CPU, probe_hit
from benchmarks.servers import RunningServer, ServerSpec, module, product
from benchmarks.stats import spread
from server.config import Settings
from server.demo import prepare_demo_database

SERVERS = ("hit", "bare-near", "noop")
# (numerator, denominator) of each ratio reported.
RATIOS = (("hit", "noop"), ("bare-near", "noop"), ("hit", "bare-near"))
LABELS = {
    "hit / noop": "cache hit / no-op ceiling",
    "bare-near / noop": "bare dictionary hit / no-op ceiling",
    "hit / bare-near": "cache hit / bare dictionary hit",
}
_WARM_S = 1.0


def orders(rounds: int) -> list[tuple[str, ...]]:
    """Each round's order: the six permutations in turn, so each server follows each other equally."""
    permutations = list(itertools.permutations(SERVERS))
    return [permutations[index % len(permutations)] for index in range(rounds)]


def _specs(scratch: Path, redis_url: str, prefix: str) -> dict[str, ServerSpec]:
    env = {
        "CACHEASIDE_DATABASE_URL": f"sqlite+aiosqlite:///{scratch}/alternate.db",
        "CACHEASIDE_REDIS_URL": redis_url,
        "CACHEASIDE_KEY_PREFIX": prefix,
        "CACHEASIDE_EVENT_LOOP": LOOP,
        "CACHEASIDE_WARM_ON_START": "false",
    }
    bench = ("benchmarks.aio_server", "--loop", LOOP)
    near = ("--mode", "near", "--redis-url", redis_url, "--key-prefix", prefix)
    return {
        "hit": product("hit", env, cpus=SERVER_CPU),
        "bare-near": module("bare-near", *bench, *near, cpus=SERVER_CPU),
        "noop": module("noop", *bench, "--mode", "noop", cpus=SERVER_CPU),
    }


def _drive(server: RunningServer, duration_s: float) -> float:
    load = h2load.run(server.target, GET_POST, HIT_REQUEST, duration_s=duration_s, cpus=LOAD_CPU)
    if not load["succeeded"] or load["http_errors"]:
        raise RuntimeError(f"{server.spec.name}: {load['succeeded']:.0f} calls succeeded, {load}")
    return float(load["req_per_s"])


def summarize(runs: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each ratio: the median of the rounds' own with quartiles, min and max, and the ratio of sums."""
    found = {}
    for numerator, denominator in RATIOS:
        per_round = [run[numerator] / run[denominator] for run in runs]
        low, _, high = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
        of_sums = sum(run[numerator] for run in runs) / sum(run[denominator] for run in runs)
        found[f"{numerator} / {denominator}"] = spread(per_round) | {
            "q1": low,
            "q3": high,
            "of_sums": of_sums,
        }
    return found


async def measure(rounds: int, duration_s: float) -> dict[str, Any]:
    """Start the three servers, check what each answers, then alternate them for the rounds (h2load and
    the servers' start block the event loop, which runs nothing else meanwhile)."""
    with bench_redis_url() as redis_url, tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        prefix = f"alternate-{uuid.uuid4().hex[:8]}"
        await prepare_demo_database(Settings(database_url=f"sqlite+aiosqlite:///{scratch}/alternate.db"))
        specs = _specs(scratch, redis_url, prefix)
        load_generator = h2load.binary()
        described = await machine.describe(redis_url=redis_url, database_url="sqlite:", h2load=load_generator)
        started: dict[str, RunningServer] = {}
        try:
            # The product first: the bare dictionary hit reads the post the product cached.
            for name in SERVERS:
                started[name] = server = RunningServer(specs[name], scratch)
                server.wait_listening()
                _drive(server, _WARM_S)
            answers = {name: probe_hit(server.target) for name, server in started.items()}
            if answers["hit"][1] != "hit" or answers["bare-near"][0] != answers["hit"][0]:
                raise RuntimeError(f"the product and its bare twin do not answer the same hit: {answers}")
            before = started["hit"].counters()
            runs = []
            for number, order in enumerate(orders(rounds)):
                run = {name: _drive(started[name], duration_s) for name in order}
                runs.append(run)
                shown = "  ".join(f"{name} {run[name]:7,.0f}" for name in SERVERS)
                print(
                    f"round {number + 1:>3}/{rounds} {shown}  hit/noop {run['hit'] / run['noop']:.3f}",
                    flush=True,
                )
            # The product's own count (h2load sees only the HTTP status).
            failed = server_failures(before, started["hit"].counters(), "GetPost")
            if failed:
                raise RuntimeError(f"the product answered GetPosts with errors: {failed}")
        finally:
            for server in started.values():
                server.stop()
    return {
        "scenario": "GetPost of one key: the product's hit, a bare dictionary hit and the no-op, alternated",
        "machine": described,
        "rounds": rounds,
        "duration_s": duration_s,
        "server_cpu": SERVER_CPU,
        "runs": runs,
        "ratios": summarize(runs),
    }


async def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure, print, save."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30, help="rounds of one run of each server")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds of load per run")
    parser.add_argument("--no-save", action="store_true", help="print only (the tests)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0:
        parser.error("--rounds must be at least 1 and --duration above 0")
    result = await measure(args.rounds, args.duration)
    print("machine:", machine.one_line(result["machine"]))
    print(
        f"{args.rounds} rounds of {args.duration:g} s per server, "
        f"server on core {SERVER_CPU}, h2load on core {LOAD_CPU}"
    )
    for name, ratio in result["ratios"].items():
        print(
            f"- {LABELS[name]}: {report.ratio_text(ratio['median'])}x median of the rounds "
            f"(quartiles {report.ratio_text(ratio['q1'])}-{report.ratio_text(ratio['q3'])}, "
            f"min-max {report.ratio_text(ratio['min'])}-{report.ratio_text(ratio['max'])}); "
            f"{report.ratio_text(ratio['of_sums'])}x of the summed req/s"
        )
    if not args.no_save:
        save_result("alternate", result)
    return result


if __name__ == "__main__":
    asyncio.run(main())
