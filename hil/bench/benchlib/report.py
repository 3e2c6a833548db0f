"""A benchmark's report: its header and last line, tables, headings and notes, and the figures `make bench` judges."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version

from ._root import ROOT

# --- the report's header and last line ------------------------------------------------------------


def git_revision() -> str:
    """`git describe --always --dirty` of the checkout, or "unknown"."""
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_version(name: str) -> str:
    """An installed distribution's version, or "not installed"."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def loadavg(averages: int = 3) -> str:
    """The 1, 5 and 15 minute load averages (or the first `averages` of them)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg()[:averages])


def print_header(title: str, versions: Mapping[str, str], details: Sequence[str] = (), skews: str = "") -> None:
    """What ran where, so that the numbers can be compared later.

    The first line names the benchmark, the time, the commit, Python, `versions` (name -> version)
    and the machine; then the `details` lines; last the load average at the start, followed by
    "(other work on the machine skews <skews>)" when `skews` is given.
    """
    print(
        ", ".join(
            [
                f"Fieldgate {title} benchmark",
                time.strftime("%Y-%m-%d %H:%M"),
                f"commit {git_revision()}",
                f"Python {platform.python_version()}",
                *(f"{name} {ver}" for name, ver in versions.items()),
                f"{os.cpu_count()} CPUs",
                f"Linux {platform.release()}",
            ]
        )
    )
    for line in details:
        print(line)
    print(f"load average at start {loadavg()}" + (f" (other work on the machine skews {skews})" if skews else ""))


def run_summary(started: float, averages: int = 3) -> str:
    """The report's last line: the run time since `started` (time.monotonic()) and the load average at the end."""
    return f"total run time {time.monotonic() - started:.0f} s; load average at end {loadavg(averages)}"


def progress(text: str) -> None:
    """What is running now (stderr, so that stdout stays the report)."""
    print(f"  [{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- headline figures for `make bench` ----------------------------------------------------------------

#: When set, record() appends each headline figure to this file (JSON lines); hil/bench/suite.py reads it.
RESULTS_ENV = "FIELDGATE_BENCH_RESULTS"


def record(
    bench: str,
    figure: str,
    value: float,
    unit: str = "",
    *,
    ratio: float | None = None,
    versus: str = "",
    goal: float | None = None,
    most: float | None = None,
) -> None:
    """Hand one headline figure to the suite's table (a no-op when the script runs on its own).

    `value` in `unit`; `ratio` is value over a reference measured in the same run, named by `versus`
    (e.g. "line limit 150 tx/s"), or computed, with its formula in `versus`. The goal is on the ratio
    when there is one, else on the value: `goal` the least it may be, `most` the most.

    A figure that could not be measured is recorded all the same, with `value` (or `ratio`) NaN and
    the goal it would have had: the suite shows it as "not measured" and counts it as missed.
    """
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    row = dict(bench=bench, figure=figure, value=value, unit=unit, ratio=ratio, versus=versus, goal=goal, most=most)
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


# --- tables and lines -------------------------------------------------------------------------------


def print_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    thousands: bool = False,
    blank: str | None = None,
    fill: Sequence[str] = (),
) -> None:
    """Print rows under headers: text left-aligned, numbers right-aligned.

    Floats get 3 significant digits (no decimals from 100 on). `thousands`: ints get separators too.
    `blank`: the text of a missing value: a NaN prints as it, and cells that are it (or "") do not
    keep a column of numbers from being right-aligned; nor do cells that are one of `fill`
    (e.g. "not measured").
    """
    cells = [[str(h) for h in headers]] + [[_cell(v, thousands, blank) for v in row] for row in rows]
    gaps = (*(("", blank) if blank is not None else ()), *fill)
    numeric = [all(_is_number(row[i]) or row[i] in gaps for row in rows) for i in range(len(headers))]
    widths = [max(len(line[i]) for line in cells) for i in range(len(headers))]

    def fmt(line: list[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(line, widths, numeric, strict=True)]
        return "  " + "  ".join(parts).rstrip()

    print(fmt(cells[0]))
    print("  " + "  ".join("-" * w for w in widths))
    for line in cells[1:]:
        print(fmt(line))


def _cell(value: object, thousands: bool, blank: str | None) -> str:
    if isinstance(value, float):
        if blank is not None and math.isnan(value):
            return blank
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if thousands and _is_number(value):
        return f"{value:,}"
    return str(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def heading(title: str) -> None:
    """Print a figure's title."""
    print()
    print(title)
    print("=" * len(title))


def note(text: str) -> None:
    """Print an explanatory line under a table."""
    print(f"     {text}")


def summary(text: str) -> None:
    """Print one figure's conclusion."""
    print(f"  => {text}")


# --- numbers --------------------------------------------------------------------------------------


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """The q-quantile of an already sorted list (nan when empty)."""
    if not sorted_xs:
        return float("nan")
    return sorted_xs[min(len(sorted_xs) - 1, int(q * len(sorted_xs)))]


def latency_summary(latencies: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / max of latencies in seconds, in milliseconds (empty when there are none)."""
    if not latencies:
        return {}
    xs = sorted(latencies)
    return {"p50": percentile(xs, 0.50) * 1000, "p99": percentile(xs, 0.99) * 1000, "max": xs[-1] * 1000}
