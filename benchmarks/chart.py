"""The suite's PNG: req/s (median, min-max whiskers) and server CPU per request, per scenario."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def draw(path: Path, names: Sequence[str], summary: dict[str, dict[str, Any]], title: str) -> None:
    """Write the chart; needs matplotlib (the `bench` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in names if name in summary]
    rate = [summary[name]["req_per_s"] for name in names]
    cpu = [summary[name]["cpu_us_per_request"]["median"] for name in names]
    medians = [r["median"] for r in rate]
    whiskers = [[m - r["min"] for m, r in zip(medians, rate, strict=True)],
                [r["max"] - m for m, r in zip(medians, rate, strict=True)]]  # fmt: skip
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(13, 0.42 * len(names) + 1.6), sharey=True, gridspec_kw={"width_ratios": [2, 1]}
    )
    rows = range(len(names))
    left.barh(rows, medians, xerr=whiskers, color="#4C72B0", capsize=3)
    left.set_yticks(list(rows), names)
    left.invert_yaxis()
    left.set_xlabel("calls per second (median, min-max)")
    for row, value, spread in zip(rows, medians, rate, strict=True):
        left.text(spread["max"], row, f"  {value:,.0f}", va="center", fontsize=8)  # past the whisker
    right.barh(rows, cpu, color="#DD8452")
    right.set_xlabel("server CPU per call, microseconds (median)")
    for row, value in zip(rows, cpu, strict=True):
        right.text(value, row, f" {value:,.0f}", va="center", fontsize=8)
    figure.suptitle(textwrap.fill(title, 150), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
