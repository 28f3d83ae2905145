"""Instructions per call, counted by valgrind's callgrind: the hit against the ceiling without the noise.

On a shared virtual machine req/s moves 5-10% from one run to the next; the instructions a server
executes per call do not. This runs each server under `valgrind --tool=callgrind`, warms it, zeroes
the counters, sends a fixed number of GetPost calls with h2load (16 connections x 4 streams, as in
`make bench`), dumps the counters, and divides. Counted: every thread of the server in user space (the
event loop, grpc's poller and its event-engine threads), not the kernel's share, which is about the
same per call for all three (the same grpc.aio sends and receives). The servers: `noop`
(benchmarks/aio_server.py --mode noop, the ceiling), `bare-near` (--mode near, a dictionary hit) and
`hit` (the product as it ships, a near-cache hit). Prints the table and the ratios; writes
benchmarks/results/instructions.json.

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

import grpc

from benchmarks import h2load
from benchmarks.environment import bench_redis_url, save_result
from benchmarks.servers import RunningServer, ServerSpec
from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server.config import Settings
from server.demo import prepare_demo_database
from server.domain.keys import key_prefix
from server.seed import post_id

GET_POST = "/cacheaside.v1.CacheService/GetPost"
_REQUEST = pb.GetPostRequest(post_id=post_id(1)).SerializeToString()
_WARM_CALLS = 200
_UNDER_VALGRIND_START_S = 300.0


def _callgrind(out_file: Path, argv: list[str]) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}", *argv]


def _specs(scratch: Path, redis_url: str, prefix: str) -> dict[str, ServerSpec]:
    product_env = {
        "CACHEASIDE_DATABASE_URL": f"sqlite+aiosqlite:///{scratch}/instructions.db",
        "CACHEASIDE_REDIS_URL": redis_url,
        "CACHEASIDE_KEY_PREFIX": prefix,
        "CACHEASIDE_WARM_ON_START": "false",
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
            start_timeout_s=_UNDER_VALGRIND_START_S,
        )
        for name, (argv, env) in argvs.items()
    }


def _probe(target: str) -> str:
    """One real GetPost: its x-cache (empty from the bench-only servers, which send none)."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(GET_POST)
        _, answered = call.with_call(_REQUEST, timeout=60)
        return dict(answered.trailing_metadata() or ()).get("x-cache", "")


def _control(command: str, pid: int) -> None:
    # callgrind_control talks to the running valgrind through files it polls: -z zeroes, -d dumps.
    subprocess.run(["callgrind_control", command, str(pid)], check=True, capture_output=True, timeout=120)


def _count(server: RunningServer, out_file: Path, calls: int) -> dict[str, Any]:
    server.wait_listening()
    h2load.run(server.target, GET_POST, _REQUEST, duration_s=300, calls=_WARM_CALLS)
    for _ in range(50):  # the product's near cache admits once the fill's event is heard
        if _probe(server.target) in ("", "hit"):
            break
        time.sleep(0.2)
    else:
        raise RuntimeError(f"{server.spec.name} never answered from its near cache")
    _control("-z", server.pid)
    load = h2load.run(server.target, GET_POST, _REQUEST, duration_s=600, calls=calls)
    _control("-d", server.pid)
    if load["succeeded"] != calls or load["http_errors"]:
        raise RuntimeError(f"{server.spec.name}: {load['succeeded']} of {calls} calls succeeded")
    cache = _probe(server.target)
    dumps = sorted(out_file.parent.glob(f"{out_file.name}.*"))  # the -d dump: <out>.1
    if not dumps:
        raise RuntimeError(f"callgrind wrote no dump for {server.spec.name}")
    summary = next(line for line in dumps[-1].read_text().splitlines() if line.startswith("summary:"))
    return {"instructions_per_call": int(summary.split()[1]) / calls, "x_cache_after": cache}


def measure(calls: int, names: list[str]) -> dict[str, Any]:
    """Instructions per call of each named server, one after the other."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise RuntimeError("valgrind not found: apt-get install -y valgrind")
    with bench_redis_url() as redis_url, tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        prefix = f"instr-{uuid.uuid4().hex[:8]}"
        # Seeded here, natively: under valgrind the server would take minutes to seed.
        asyncio.run(
            prepare_demo_database(Settings(database_url=f"sqlite+aiosqlite:///{scratch}/instructions.db"))
        )
        specs = _specs(scratch, redis_url, prefix)
        # The product first: the bare near server reads the post the product's miss cached.
        order = [name for name in ("hit", "bare-near", "noop") if name in names]
        if "bare-near" in order and "hit" not in order:
            raise RuntimeError("bare-near reads what the product cached: measure it with hit")
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
    result = measure(args.calls, args.servers.split(","))
    result["ratios"] = ratios(result["servers"])
    for name, value in result["ratios"].items():
        print(f"- {name}: {value:.2f}x")
    if not args.no_save:
        save_result("instructions", result)
    return result


if __name__ == "__main__":
    main()
