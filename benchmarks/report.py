"""The suite's table and ratios: medians with min-max over the rounds, and the issue's goals."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.scenarios import LOOP, OTHER_LOOP, Scenario
from benchmarks.stats import spread

MEASURES = (
    "req_per_s",
    "items_per_s",
    "p50_ms",
    "p99_ms",
    "cpu_us_per_request",
    "hit_ratio",
    "db_loads_per_1000",
    "server_errors",
    "failed_at_client",
    "requests",
)


@dataclass(frozen=True)
class Ratio:
    """A ratio of two scenarios' medians, with the goal it is held to (if any)."""

    name: str
    numerator: str
    denominator: str
    measure: str = "req_per_s"
    denominator_measure: str = ""
    goal: float | None = None
    paired: bool = False
    """Run back to back in every round, A B B A (suite.py), and valued as the median of the rounds' own
    ratios: the drift of a shared machine between rounds, and within one the order, weigh on both."""


RATIOS = (
    Ratio(f"cache hit / no-op ceiling, grpc.aio {LOOP}", "hit", "noop", goal=0.95, paired=True),
    Ratio(f"Redis hit (near cache off) / no-op ceiling, grpc.aio {LOOP}", "hit-redis", "noop"),
    Ratio("near-cache hit / Redis hit", "hit", "hit-redis"),
    Ratio(f"bare dictionary hit / no-op ceiling, grpc.aio {LOOP}", "hit-bare-near", "noop"),
    Ratio("product near-cache hit / bare dictionary hit", "hit", "hit-bare-near"),
    Ratio(
        f"cache hit / no-op ceiling, grpc.aio {OTHER_LOOP}",
        f"hit-{OTHER_LOOP}",
        f"noop-{OTHER_LOOP}",
        paired=True,
    ),
    Ratio("cache hit / no-op ceiling, sync grpcio (bench server)", "hit-sync", "noop-sync", paired=True),
    Ratio("cache hit / uncached database (miss)", "hit", "miss", goal=3.0),
    Ratio(
        "BatchGetPosts(100) items/s / GetPost hits/s",
        "batch100",
        "hit",
        measure="items_per_s",
        denominator_measure="req_per_s",
        goal=50.0,
    ),
    Ratio(
        "2 workers on 2 cores, one each (pinned) / 1 worker on 1 core",
        "hit-2w-2cpu-pin",
        "hit",
        goal=1.8,
        paired=True,
    ),
    Ratio("2 workers floating on 2 cores / 1 worker on 1 core", "hit-2w-2cpu", "hit"),
    Ratio("2 workers pinned / floating, on 2 cores", "hit-2w-2cpu-pin", "hit-2w-2cpu", paired=True),
    Ratio("2 workers pinned on 2 cores / 1 worker on 2 cores", "hit-2w-2cpu-pin", "hit-1w-2cpu"),
    Ratio("2 workers on 1 core / 1 worker on 1 core", "hit-2w-1cpu", "hit"),
    Ratio(f"{LOOP} / {OTHER_LOOP}, hit", "hit", f"hit-{OTHER_LOOP}"),
    Ratio(f"{LOOP} / {OTHER_LOOP}, miss", "miss", f"miss-{OTHER_LOOP}"),
    Ratio(f"{LOOP} / {OTHER_LOOP}, BatchGetPosts(100)", "batch100", f"batch100-{OTHER_LOOP}"),
    Ratio(f"{LOOP} / {OTHER_LOOP}, no-op", "noop", f"noop-{OTHER_LOOP}"),
    Ratio("sync grpcio / grpc.aio, same bare Redis hit", "hit-sync", "hit-bare-aio"),
    Ratio("sync grpcio / grpc.aio, same bare BatchGetPosts(100)", "batch100-sync", "batch100-bare-aio"),
    Ratio("sync grpcio / grpc.aio, no-op", "noop-sync", "noop"),
    Ratio("product Redis hit / bare grpc.aio Redis hit", "hit-redis", "hit-bare-aio"),
    Ratio("sync bare Redis hit / product Redis hit", "hit-sync", "hit-redis"),
    Ratio("Redis down (breaker open) / Redis up, same Zipf load", "redis-down", "zipf"),
    Ratio("keyed generator / h2load, same no-op server", "noop-keyed", "noop"),
)


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max of each measure over one scenario's runs."""
    return {measure: spread([run[measure] for run in runs]) for measure in MEASURES if measure in runs[0]} | {
        "runs": list(runs)
    }


PAIRS = tuple((ratio.numerator, ratio.denominator) for ratio in RATIOS if ratio.paired)
"""The scenarios the suite runs back to back in every round, for the paired ratios."""


def _by_round(runs: Sequence[dict[str, Any]], measure: str) -> dict[int, float]:
    """The mean of measure over each round's runs of one scenario (two for a paired one: A B B A)."""
    found: dict[int, list[float]] = {}
    for run in runs:
        found.setdefault(run["round"], []).append(run[measure])
    return {round_number: sum(values) / len(values) for round_number, values in found.items()}


def ratios(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every ratio whose two scenarios were run: of their medians, or for a paired ratio the median of
    each round's own (its min-max too)."""
    found = []
    for ratio in RATIOS:
        if ratio.numerator not in summary or ratio.denominator not in summary:
            continue
        row: dict[str, Any] = {"name": ratio.name}
        if ratio.paired:
            tops = _by_round(summary[ratio.numerator]["runs"], ratio.measure)
            bottoms = _by_round(
                summary[ratio.denominator]["runs"], ratio.denominator_measure or ratio.measure
            )
            rounds = [tops[r] / bottoms[r] if bottoms[r] else 0.0 for r in sorted(tops) if r in bottoms]
            paired = spread(rounds)
            value = paired["median"]
            row["paired"] = {"min": round(paired["min"], 3), "max": round(paired["max"], 3)}
        else:
            top = summary[ratio.numerator][ratio.measure]["median"]
            bottom = summary[ratio.denominator][ratio.denominator_measure or ratio.measure]["median"]
            value = top / bottom if bottom else 0.0
        row |= {
            "value": round(value, 3),
            "goal": ratio.goal,
            "met": None if ratio.goal is None else value >= ratio.goal,
        }
        found.append(row)
    return found


def _cell(summary: dict[str, Any], measure: str, digits: int, *, spread_too: bool = False) -> str:
    if measure not in summary:
        return "-"
    values = summary[measure]
    text = f"{values['median']:,.{digits}f}"
    if spread_too:
        text += f" ({values['min']:,.{digits}f}-{values['max']:,.{digits}f})"
    return text


def table(scenarios: Sequence[Scenario], summary: dict[str, dict[str, Any]]) -> str:
    """The Markdown table of every scenario run, medians with req/s min-max."""
    header = ("scenario", "server", "what", "req/s median (min-max)", "p50 ms", "p99 ms", "hit ratio",
              "DB loads / 1k req", "CPU us / req")  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scenario in scenarios:
        if scenario.name not in summary:
            continue
        row = summary[scenario.name]
        cells = [
            scenario.name,
            scenario.server,
            scenario.what,
            _cell(row, "req_per_s", 0, spread_too=True),
            _cell(row, "p50_ms", 1),
            _cell(row, "p99_ms", 1),
            _cell(row, "hit_ratio", 3),
            _cell(row, "db_loads_per_1000", 1),
            _cell(row, "cpu_us_per_request", 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_text(value: float) -> str:
    """A ratio as printed: three decimals below 1, where goals such as 0.95 sit (0.948 is not 0.95)."""
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def ratio_lines(found: Sequence[dict[str, Any]]) -> str:
    """One line per ratio, with its goal and whether this run met it."""
    lines = []
    for ratio in found:
        goal = ""
        if ratio["goal"] is not None:
            goal = f"  (goal >= {ratio['goal']:g}: {'met' if ratio['met'] else 'NOT met'})"
        paired = ratio.get("paired")
        if paired is not None:  # the median of the rounds' own ratios, each from runs back to back
            goal = f", paired by round ({ratio_text(paired['min'])}-{ratio_text(paired['max'])}){goal}"
        lines.append(f"- {ratio['name']}: {ratio_text(ratio['value'])}x{goal}")
    return "\n".join(lines)


def problems(summary: dict[str, dict[str, Any]], *, in_flight: int) -> list[str]:
    """Runs with failed calls, and their gRPC codes: what a table cell does not count.

    Up to in_flight server-side failures per run are the calls cut off when the load generator stops
    (the product counts a caller that left during its answer as UNKNOWN), and are not reported.
    """
    found = []
    for name, row in summary.items():
        runs = row["runs"]
        failed = sum(run.get("failed_at_client", 0) for run in runs)
        beyond_cutoff = any(run.get("server_errors", 0) > in_flight for run in runs)
        if not failed and not beyond_cutoff:
            continue
        codes: dict[str, float] = {}
        for run in runs:
            for code, count in run.get("server_error_codes", {}).items():
                codes[code] = codes.get(code, 0) + count
        answered = sum(run["requests"] for run in runs)
        named = ", ".join(f"{count:g} {code}" for code, count in sorted(codes.items())) or "codes unknown"
        found.append(f"{name}: {failed:g} calls failed at the client over {len(runs)} runs "
                     f"({answered:,} answered); the server's failures: {named}")  # fmt: skip
    return found
