"""One measured run of one scenario: prepare and check, load, then the server's CPU and counters.

CPU per request is the server's process-tree CPU time over the run divided by the calls answered.
Hit ratio, database loads and the gRPC status of every call come from the product's own counters
(none for the bench-only servers, whose status is checked by the preparation's real call).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import h2load
from benchmarks.scenarios import LOAD_CPU, PREPARES, Scenario, Target
from benchmarks.servers import RunningServer

Counters = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass(frozen=True)
class LoadShape:
    """How hard to push: for how long, over how many connections, with how many calls in flight each."""

    duration_s: float
    connections: int = 16
    streams: int = 4


def _sum(counters: Counters, name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, pairs), value in counters.items()
        if sample == name and all(dict(pairs).get(k) == v for k, v in labels.items())
    )


def server_failures(before: Counters, after: Counters, rpc: str) -> dict[str, float]:
    """The calls of method `rpc` the product answered with an error between two scrapes, by gRPC code.

    Calls in flight when the load generator stops are cut off: CANCELLED, not failures."""
    codes = {
        dict(labels)["code"]: value - before.get((name, labels), 0.0)
        for (name, labels), value in after.items()
        if name == "cacheaside_rpc_requests_total" and dict(labels).get("rpc") == rpc
    }
    return {code: count for code, count in codes.items() if count and code not in ("OK", "CANCELLED")}


def _keyed(server: RunningServer, scenario: Scenario, bodies: Path, shape: LoadShape) -> dict[str, Any]:
    argv = [
        "taskset", "-c", LOAD_CPU, sys.executable, "-m", "benchmarks.keyed_load",
        "--target", server.target, "--path", scenario.path, "--bodies", str(bodies),
        "--connections", str(shape.connections), "--streams", str(shape.streams),
        "--duration", f"{shape.duration_s:g}",
    ]  # fmt: skip
    output = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=shape.duration_s + 60)
    result: dict[str, Any] = json.loads(output.stdout)
    return result


def _load(
    server: RunningServer, scenario: Scenario, bodies: dict[str, Path], shape: LoadShape
) -> dict[str, Any]:
    if scenario.keyed:
        return _keyed(server, scenario, bodies[scenario.keyed], shape)
    return h2load.run(
        server.target,
        scenario.path,
        scenario.body,
        duration_s=shape.duration_s,
        connections=shape.connections,
        streams=shape.streams,
        cpus=LOAD_CPU,
    )


async def measure(
    scenario: Scenario,
    server: RunningServer,
    target: Target,
    bodies: dict[str, Path],
    shape: LoadShape,
) -> dict[str, Any]:
    """Prepare (with its check call), run the load, and return this run's measures."""
    await PREPARES[scenario.prepare](target, scenario)
    has_counters = bool(server.metrics_ports)
    before = server.counters() if has_counters else {}
    cpu_before = server.cpu_seconds()
    result = await asyncio.to_thread(_load, server, scenario, bodies, shape)
    cpu = server.cpu_seconds() - cpu_before
    requests = max(int(result["requests"]), 1)
    run: dict[str, Any] = {
        "req_per_s": result["req_per_s"],
        "items_per_s": result["req_per_s"] * scenario.items,
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
        "cpu_us_per_request": cpu / requests * 1e6,
        "requests": result["requests"],
        "failed_at_client": result["failed"],
    }
    if has_counters:
        after = server.counters()
        rpc = scenario.path.rsplit("/", 1)[1]

        def delta(name: str, **labels: str) -> float:
            return _sum(after, name, **labels) - _sum(before, name, **labels)

        failed = server_failures(before, after, rpc)
        outcomes = delta("cacheaside_cache_outcomes_total", rpc=rpc)
        run |= {
            "server_ok": delta("cacheaside_rpc_requests_total", rpc=rpc, code="OK"),
            "server_errors": sum(failed.values()),
            "server_error_codes": failed,
            "hit_ratio": delta("cacheaside_cache_outcomes_total", rpc=rpc, outcome="hit") / max(outcomes, 1),
            "db_loads_per_1000": delta("cacheaside_db_loads_total") / requests * 1000,
        }
    return run
