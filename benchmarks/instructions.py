"""Instructions per call, counted by valgrind's callgrind: the hit against the ceiling without the noise.

On a shared virtual machine req/s moves 5-10% from one run to the next; the instructions a server
executes per call do not. This runs each server under `valgrind --tool=callgrind`, warms it, zeroes
the counters, sends a fixed number of GetPost calls with h2load (16 connections x 4 streams, as in
`make bench`), dumps the counters, and divides. Counted: every thread of the server in user space (the
event loop, grpc's poller and its event-engine threads), not the kernel's share, which is about the
same per call for all three (the same grpc.aio sends and receives). The servers: `noop`
(benchmarks/aio_server.py --mode noop, the ceiling), `bare-near` (--mode near, a dictionary hit) and
`hit` (the product as it ships, a near-cache hit, with its background work made rare: under valgrind
the counted calls take seconds, and health checks, near-cache renewals and the audit would weigh
many times what they do at full speed; its counters must show every counted call a near-cache hit).
Connection setup (16 new connections per count) is in every server's figure alike. Prints the table
and the ratios; writes benchmarks/results/instructions.json.

    python -m benchmarks.instructions [--calls 2000] [--servers noop,bare-near,hit]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks import h2load, report
from benchmarks.environment import bench_redis_url, save_result
from benchmarks.scenarios import GET_POST, HIT_REQUEST, probe_hit
from benchmarks.servers import RunningServer, ServerSpec
from server.config import Settings
from server.demo import prepare_demo_database
from server.domain.keys import key_prefix

_WARM_CALLS = 200
_UNDER_VALGRIND_START_S = 300.0


_SERVERS = ("hit", "bare-near", "noop")  # in this order: bare-near reads the post the product cached


def _callgrind(out_file: Path, argv: list[str]) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}", *argv]


def _specs(scratch: Path, redis_url: str, prefix: str) -> dict[str, ServerSpec]:
    # The product as it ships, but for its background work: under valgrind the counted calls take
    # seconds, so a health check every second, a near-cache entry's 1 s TTL (a Redis read to renew
    # it) and the audit would land in the count many times more often than at full speed.
    product_env = {
        "CACHEASIDE_DATABASE_URL": f"sqlite+aiosqlite:///{scratch}/instructions.db",
        "CACHEASIDE_REDIS_URL": redis_url,
        "CACHEASIDE_KEY_PREFIX": prefix,
        "CACHEASIDE_WORKERS": "1",  # valgrind follows no child
        "CACHEASIDE_WARM_ON_START": "false",
        "CACHEASIDE_WARM_WORKER": "false",
        "CACHEASIDE_AUDIT_INTERVAL_S": "0",
        "CACHEASIDE_HEALTH_INTERVAL_MS": "3600000",
        "CACHEASIDE_NEAR_CACHE_TTL_MS": "3600000",
    }
    bench = [sys.executable, "-m", "benchmarks.aio_server", "--listen", "{listen}", "--loop", "uvloop"]
    near = ["--mode", "near", "--redis-url", redis_url, "--key-prefix", prefix]
    argvs = {
        "hit": ([sys.executable, "-m", "server"], product_env),
        "bare-near": ([*bench, *near], {}),
        "noop": ([*bench, "--mode", "noop"], {}),
    }
    return {
        name: ServerSpec(
            name,
            _callgrind(scratch / f"{name}.out", argv),
            cpus="1",
            env=env,
            metrics=name == "hit",  # its counters say every counted call was a near-cache hit
            start_timeout_s=_UNDER_VALGRIND_START_S,
        )
        for name, (argv, env) in argvs.items()
    }


def _control(command: str, pid: int) -> None:
    # callgrind_control talks to the running valgrind through files it polls: -z zeroes, -d dumps.
    # It exits 0 even when it found no such process, so its "OK." is what tells.
    argv = ["callgrind_control", command, str(pid)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if "OK." not in done.stdout:
        raise RuntimeError(f"callgrind_control {command} {pid} failed: {done.stdout}{done.stderr}")


_NEAR_HITS = ("cacheaside_near_cache_total", (("event", "hits"),))
_GET_POST_OK = ("cacheaside_rpc_requests_total", (("code", "OK"), ("rpc", "GetPost")))


def _count(server: RunningServer, out_file: Path, calls: int) -> dict[str, Any]:
    server.wait_listening()
    h2load.run(server.target, GET_POST, HIT_REQUEST, duration_s=300, calls=_WARM_CALLS)
    for _ in range(50):  # the product's near cache admits once the fill's event is heard
        if probe_hit(server.target, timeout_s=60)[1] in ("", "hit"):
            break
        time.sleep(0.2)
    else:
        raise RuntimeError(f"{server.spec.name} never answered from its near cache")
    before = server.counters() if server.spec.metrics else {}
    _control("-z", server.pid)
    load = h2load.run(server.target, GET_POST, HIT_REQUEST, duration_s=600, calls=calls)
    _control("-d", server.pid)
    if load["succeeded"] != calls or load["http_errors"]:
        raise RuntimeError(f"{server.spec.name}: {load['succeeded']} of {calls} calls succeeded")
    if server.spec.metrics:  # read outside the counted window: a scrape runs Python in the server
        after = server.counters()
        for counter in (_NEAR_HITS, _GET_POST_OK):
            rose = after.get(counter, 0) - before.get(counter, 0)
            if rose != calls:
                raise RuntimeError(f"{server.spec.name}: {counter[0]} rose by {rose:.0f}, not {calls}")
    dump = out_file.with_name(f"{out_file.name}.1")  # the -d dump; the one at exit is <out> itself
    summary = next(line for line in dump.read_text().splitlines() if line.startswith("summary:"))
    return {"instructions_per_call": int(summary.split()[1]) / calls}


def measure(calls: int, names: list[str]) -> dict[str, Any]:
    """Instructions per call of each named server, one after the other."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise RuntimeError("valgrind not found: apt-get install -y valgrind")
    with bench_redis_url() as redis_url, tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        prefix = f"instr-{uuid.uuid4().hex[:8]}"
        if "hit" in names:  # seeded here, natively: under valgrind the server would take minutes
            database_url = f"sqlite+aiosqlite:///{scratch}/instructions.db"
            asyncio.run(prepare_demo_database(Settings(database_url=database_url)))
        specs = _specs(scratch, redis_url, prefix)
        order = [name for name in _SERVERS if name in names]
        counts: dict[str, Any] = {}
        for name in order:
            server = RunningServer(specs[name], scratch)
            try:
                counts[name] = _count(server, scratch / f"{name}.out", calls)
            finally:
                server.stop()
            print(
                f"{name:10s} {counts[name]['instructions_per_call']:>10,.0f} instructions per call",
                flush=True,
            )
    return {"calls": calls, "servers": counts, "key_prefix": key_prefix(prefix)}


def ratios(counts: dict[str, Any]) -> dict[str, float]:
    """Per-call instructions of the ceiling over each server's: the instruction-count twin of req/s ratios."""
    per_call = {name: row["instructions_per_call"] for name, row in counts.items()}
    found = {}
    if "noop" in per_call and "hit" in per_call:
        found["no-op / hit"] = per_call["noop"] / per_call["hit"]
    if "noop" in per_call and "bare-near" in per_call:
        found["no-op / bare dictionary hit"] = per_call["noop"] / per_call["bare-near"]
    if "bare-near" in per_call and "hit" in per_call:
        found["bare dictionary hit / hit"] = per_call["bare-near"] / per_call["hit"]
    return found


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Count, print, save."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="GetPost calls counted per server")
    parser.add_argument("--servers", default="noop,bare-near,hit", help="comma-separated: noop,bare-near,hit")
    parser.add_argument("--no-save", action="store_true", help="print only (the tests)")
    args = parser.parse_args(argv)
    names = args.servers.split(",")
    unknown = set(names) - set(_SERVERS)
    if unknown:
        parser.error(f"unknown servers {', '.join(sorted(unknown))}; choose from {', '.join(_SERVERS)}")
    if "bare-near" in names and "hit" not in names:
        parser.error("bare-near reads the post the product cached: count it together with hit")
    result = measure(args.calls, names)
    result["ratios"] = ratios(result["servers"])
    for name, value in result["ratios"].items():
        print(f"- {name}: {report.ratio_text(value)}x")
    if not args.no_save:
        save_result("instructions", result)
    return result


if __name__ == "__main__":
    main()
