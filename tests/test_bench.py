"""The benchmark harness (`make bench`) in a tiny mode, so it cannot rot between benchmark runs.

Half a second of load per scenario over 2,000 posts: the numbers mean nothing here, but every kind of
scenario must run end to end (h2load and the keyed generator, the product on both event loops, Redis
down, the bench-only servers) and what the server reports must match what the scenario claims.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from benchmarks import alternate, instructions, report, runner, servers, suite
from benchmarks.keyed_load import header_block, read_bodies, write_bodies
from benchmarks.scenarios import LOOP, OTHER_LOOP, scenarios
from server.app import run

TINY = f"hit,miss,zipf,batch100,redis-down,noop,hit-{OTHER_LOOP},hit-sync"


def _require(command: str, package: str) -> None:
    # make bench-deps installs it; without it the test skips, except under CI, where it fails.
    if shutil.which(command) is None:
        message = f"{command} not installed (apt-get install {package}, or make bench-deps)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def h2load() -> None:
    _require("h2load", "nghttp2-client")


@pytest.fixture
def valgrind() -> None:
    _require("callgrind_control", "valgrind")


@pytest.mark.timeout(90)
async def test_the_suite_runs_every_kind_of_scenario_and_checks_it(h2load: None, tmp_path: Path) -> None:
    argv = ["--duration", "0.5", "--rounds", "1", "--posts", "2000", "--scenarios", TINY,
            "--skip-others", "--results-dir", str(tmp_path)]  # fmt: skip
    result = await suite.main(argv)

    rows = result["scenarios"]
    assert set(rows) == set(TINY.split(","))
    for name, row in rows.items():
        assert row["req_per_s"]["median"] > 0, name
        # Misses past CACHEASIDE_MAX_CONCURRENT_LOADS are refused (DATABASE_SATURATED); nothing else fails.
        assert row["failed_at_client"]["max"] <= (0.1 * row["requests"]["max"] if name == "miss" else 0), name
        assert row["cpu_us_per_request"]["median"] > 0, name
    assert rows["hit"]["hit_ratio"]["median"] == 1.0
    assert rows[f"hit-{OTHER_LOOP}"]["hit_ratio"]["median"] == 1.0
    assert rows["miss"]["hit_ratio"]["median"] == 0.0  # every call a new key after invalidation
    assert rows["miss"]["db_loads_per_1000"]["median"] > 900
    assert 0 < rows["zipf"]["hit_ratio"]["median"] < 1
    assert rows["redis-down"]["hit_ratio"]["median"] == 0.0  # bypassed, never hit
    assert rows["batch100"]["items_per_s"]["median"] == pytest.approx(
        100 * rows["batch100"]["req_per_s"]["median"]
    )
    assert "hit_ratio" not in rows["noop"]  # bench-only servers have no counters
    ratios = {ratio["name"]: ratio for ratio in result["ratios"]}
    assert ratios["cache hit / uncached database (miss)"]["value"] > 0
    assert json.loads((tmp_path / "suite.json").read_text())["machine"]["cores"] >= 1
    assert (tmp_path / "suite.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.timeout(180)
def test_instructions_per_call_are_counted_over_the_calls_sent_only(h2load: None, valgrind: None) -> None:
    # The no-op server alone: the product under valgrind takes a minute to start. Counted from a zero
    # after the warm-up to a dump after the calls: with startup's billions in it, 100 calls would read
    # tens of millions each.
    counted = instructions.main(["--servers", "noop", "--calls", "100", "--no-save"])["servers"]["noop"]
    assert 50_000 < counted["instructions_per_call"] < 2_000_000


@pytest.mark.timeout(90)
async def test_the_alternation_drives_the_hit_its_bare_twin_and_the_ceiling_in_turn(h2load: None) -> None:
    result = await alternate.main(["--rounds", "2", "--duration", "0.3", "--no-save"])

    assert len(result["runs"]) == 2
    for one in result["runs"]:
        assert set(one) == set(alternate.SERVERS)
        assert all(req_per_s > 0 for req_per_s in one.values())
    ratio = result["ratios"]["hit / noop"]
    assert ratio["min"] <= ratio["median"] <= ratio["max"]
    assert ratio["of_sums"] == pytest.approx(
        sum(one["hit"] for one in result["runs"]) / sum(one["noop"] for one in result["runs"])
    )


def test_alternation_orders_put_each_server_before_each_other_equally_often() -> None:
    rounds = alternate.orders(12)
    positions = Counter((order.index(name), name) for order in rounds for name in alternate.SERVERS)
    assert set(positions.values()) == {4}, "each server in each place 4 times in 12 rounds"
    before = Counter((a, b) for order in rounds for a, b in itertools.pairwise(order))
    assert set(before.values()) == {4}, "each server right before each other 4 times"


def test_a_ratio_is_the_median_of_the_rounds_own_and_of_their_sums() -> None:
    runs = [{"hit": 90.0, "bare-near": 95.0, "noop": 100.0}, {"hit": 50.0, "bare-near": 50.0, "noop": 50.0},
            {"hit": 180.0, "bare-near": 190.0, "noop": 200.0}]  # fmt: skip
    found = alternate.summarize(runs)["hit / noop"]
    assert (found["median"], found["min"], found["max"]) == (0.9, 0.9, 1.0)
    assert found["of_sums"] == pytest.approx(320 / 350)


def test_request_sequences_survive_the_file_round_trip(tmp_path: Path) -> None:
    bodies = [b"", b"\x0a\x08p0000001", bytes(300)]
    write_bodies(tmp_path / "bodies.bin", bodies)
    assert read_bodies(tmp_path / "bodies.bin") == bodies


def test_the_request_header_block_is_plain_hpack_literals() -> None:
    block = header_block("127.0.0.1:1", "/cacheaside.v1.CacheService/GetPost")
    assert block.startswith(b"\x83\x86\x04\x23/cacheaside.v1.CacheService/GetPost")
    assert b"\x0f\x10\x10application/grpc" in block  # content-type: static entry 31
    assert block.endswith(b"\x00\x02te\x08trailers")


def test_the_event_loop_setting_picks_uvloop() -> None:
    import asyncio

    import uvloop

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert run(loop_type(), "uvloop") is uvloop.Loop
    assert run(loop_type(), "asyncio") is not uvloop.Loop


def test_the_scenarios_of_paired_ratios_run_back_to_back() -> None:
    names = (
        "hit",
        "miss",
        "noop",
        "zipf",
        "hit-2w-2cpu",
        "hit-2w-2cpu-pin",
        f"hit-{OTHER_LOOP}",
        f"noop-{OTHER_LOOP}",
    )
    blocks = suite._blocks([scenario for scenario in scenarios() if scenario.name in names])
    assert [[scenario.name for scenario in block] for block in blocks] == [
        # three pairs, each sharing a scenario with the next: one chain, each pair adjacent
        ["hit-2w-2cpu", "hit-2w-2cpu-pin", "hit", "noop"],
        ["miss"],
        ["zipf"],
        [f"hit-{OTHER_LOOP}", f"noop-{OTHER_LOOP}"],
    ]


def test_a_round_runs_each_block_of_pairs_forwards_then_backwards() -> None:
    names = ("hit", "miss", "noop")
    blocks = suite._blocks([scenario for scenario in scenarios() if scenario.name in names])
    orders = [[scenario.name for scenario in suite._round_order(blocks, r)] for r in range(3)]
    assert orders == [
        ["hit", "noop", "noop", "hit", "miss"],
        ["miss", "hit", "noop", "noop", "hit"],
        ["hit", "noop", "noop", "hit", "miss"],
    ]


def test_a_paired_ratio_is_the_median_of_each_rounds_own() -> None:
    def row(*values: float) -> dict[str, Any]:
        # Two runs a round, as A B B A runs them: each round's mean is the value given for it.
        runs = [
            {"req_per_s": value + delta, "round": r} for r, value in enumerate(values) for delta in (5, -5)
        ]
        return {"req_per_s": {"median": sorted(values)[1]}, "runs": runs}

    # Drift: the machine slows between rounds, and each round's pair slows alike.
    summary = {"hit": row(1000.0, 600.0, 300.0), "noop": row(1040.0, 640.0, 310.0)}
    found = {ratio["name"]: ratio for ratio in report.ratios(summary)}
    ceiling = found[f"cache hit / no-op ceiling, grpc.aio {LOOP}"]
    assert ceiling["value"] == round(1000 / 1040, 3), "the median of 0.96, 0.94 and 0.97, not 600/640"
    assert ceiling["paired"] == {"min": round(600 / 640, 3), "max": round(300 / 310, 3)}
    assert ceiling["met"] is True


def test_server_failures_are_the_methods_errors_since_the_first_scrape_without_cut_off_calls() -> None:
    def sample(rpc: str, code: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        return ("cacheaside_rpc_requests_total", (("code", code), ("rpc", rpc)))

    before = {sample("GetPost", "OK"): 10.0, sample("GetPost", "UNAVAILABLE"): 2.0}
    after = before | {
        sample("GetPost", "OK"): 90.0,
        sample("GetPost", "UNAVAILABLE"): 5.0,
        sample("GetPost", "CANCELLED"): 4.0,  # cut off when the load generator stopped
        sample("GetPost", "UNKNOWN"): 1.0,  # new since the first scrape
        sample("Warm", "INTERNAL"): 7.0,  # another method
    }
    assert runner.server_failures(before, after, "GetPost") == {"UNAVAILABLE": 3.0, "UNKNOWN": 1.0}
    assert runner.server_failures(after, after, "GetPost") == {}


def test_a_ratio_just_short_of_its_goal_is_not_printed_as_the_goal() -> None:
    ratio = {"name": "hit / ceiling", "value": 0.948, "goal": 0.95, "met": False}
    ratio["paired"] = {"min": 0.941, "max": 0.962}
    assert report.ratio_lines([ratio]) == (
        "- hit / ceiling: 0.948x, paired by round (0.941-0.962)  (goal >= 0.95: NOT met)"
    )
    batch = {"name": "batch", "value": 97.355, "goal": 50.0, "met": True}
    assert report.ratio_lines([batch]) == "- batch: 97.36x  (goal >= 50: met)"


def test_a_server_whose_port_was_taken_before_it_bound_it_starts_again_on_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, not listening: as an outgoing connection holds a port
        taken_port = taken.getsockname()[1]
        handed = iter([taken_port])
        unpromised = servers._unpromised_port
        monkeypatch.setattr(servers, "_unpromised_port", lambda: next(handed, None) or unpromised())
        server = servers.RunningServer(
            servers.module("noop", "benchmarks.aio_server", "--mode", "noop", cpus="0"), tmp_path
        )
        try:
            server.wait_listening()
            assert server.port != taken_port, "started again on another port"
        finally:
            server.stop()
