"""`make bench`: every benchmark of hil/bench in one go, their headline figures in one table.

Each benchmark runs as its own process with the arguments below (shorter windows than their
defaults where a figure settles quickly) and writes its full report to var/bench/<time>/<name>.txt;
its headline figures come back through benchlib.record(). The table gives each figure, its ratio to
the reference measured in the same run where one exists, the goal, and whether it was met. A
benchmark that fails is reported as such and the others still run; the exit code is 1 then.

Run from the repository root:  .venv/bin/python hil/bench/suite.py [--only modbus,mcp] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# benchlib first: it puts the repository on sys.path.
from benchlib import RESULTS_ENV, ROOT, loadavg, package_version, print_header, print_table, run_summary

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Bench:
    """One benchmark script and the arguments the suite gives it."""

    name: str
    script: str
    args: tuple[str, ...] = ()


def benches(out: Path) -> list[Bench]:
    """What the suite runs, in order: the quick, quiet ones first."""
    return [
        Bench("gateway", "gateway_bench.py"),
        Bench("line", "line_bench.py"),
        Bench("modbus", "modbus_bench.py"),
        Bench(
            "spool",
            "spool_bench.py",
            ("--dir", str(out / "spool"), "--figures", "1,4,5", "--outbox-seconds", "10", "--profile", "never"),
        ),
        Bench("mcp", "mcp_bench.py", ("--clients", "100,1000,max", "--profile-at", "", "--compare-at", "")),
        Bench("hostile", "hostile_bench.py"),
    ]


def run(bench: Bench, out: Path, results: Path) -> tuple[int, float]:
    """Run one benchmark, its report to out/<name>.txt; (exit code, seconds)."""
    env = {**os.environ, RESULTS_ENV: str(results)}
    started = time.monotonic()
    with (out / f"{bench.name}.txt").open("w") as report:
        code = subprocess.run(
            [sys.executable, str(HERE / bench.script), *bench.args],
            cwd=ROOT,
            env=env,
            stdout=report,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    return code, time.monotonic() - started


def verdict(row: dict[str, Any]) -> str:
    """Whether a figure met its goal: "yes", "NO" or "" when it has none."""
    judged = row["ratio"] if row["ratio"] is not None else row["value"]
    if row["goal"] is None and row["most"] is None:
        return ""
    ok = (row["goal"] is None or judged >= row["goal"]) and (row["most"] is None or judged <= row["most"])
    return "yes" if ok else "NO"


def goal_text(row: dict[str, Any]) -> str:
    """The goal as it reads in the table: ">= 0.9", "<= 10 fsync/s"."""
    unit = "" if row["ratio"] is not None else f" {row['unit']}"

    def number(x: float) -> str:
        return f"{x:,.0f}" if float(x).is_integer() else f"{x:g}"

    parts = []
    if row["goal"] is not None:
        parts.append(f">= {number(row['goal'])}{unit}")
    if row["most"] is not None:
        parts.append(f"<= {number(row['most'])}{unit}")
    return ", ".join(parts)


def table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[object]]]:
    """The suite's table: headers and rows."""
    headers = ["bench", "figure", "value", "unit", "ratio", "versus (same run)", "goal", "met"]
    cells: list[list[object]] = []
    for r in rows:
        ratio = float("nan") if r["ratio"] is None else float(r["ratio"])
        value = float(r["value"])
        cells.append([r["bench"], r["figure"], value, r["unit"], ratio, r["versus"], goal_text(r), verdict(r)])
    return headers, cells


def print_markdown(headers: list[str], cells: list[list[object]]) -> None:
    """The table again as Markdown, for the README."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            if v != v:  # NaN: no ratio
                return ""
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in cells:
        print("| " + " | ".join(cell(v) for v in row) + " |")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, print the table."""
    parser = argparse.ArgumentParser(description="All of Fieldgate's benchmarks, one table (hil/bench/README.md).")
    parser.add_argument("--only", default="", help="comma-separated names to run (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="where the full reports go (default var/bench/<time>)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown too")
    args = parser.parse_args(argv)
    out = args.out or ROOT / "var" / "bench" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    results.unlink(missing_ok=True)
    chosen = benches(out)
    if args.only:
        names = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = names - {b.name for b in chosen}
        if unknown:
            parser.error(f"no benchmark named {', '.join(sorted(unknown))}; known: {', '.join(b.name for b in chosen)}")
        chosen = [b for b in chosen if b.name in names]
    started = time.monotonic()
    versions = {n: package_version(n) for n in ("pymodbus", "amqtt", "paho-mqtt")}
    print_header("suite", versions, [f"full reports: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}"])
    failed = []
    for bench in chosen:
        print(f"  {bench.name:<8} {shlex.join([bench.script, *bench.args])}", flush=True)
        code, seconds = run(bench, out, results)
        status = "ok" if code == 0 else f"FAILED (exit {code}, see {bench.name}.txt)"
        print(f"  {'':<8} {seconds:.0f} s, {status}; load average {loadavg(1)}", flush=True)
        if code:
            failed.append(bench.name)
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    headers, cells = table(rows)
    print()
    print_table(headers, cells, blank="")
    if args.markdown:
        print()
        print_markdown(headers, cells)
    missed = [r["figure"] for r in rows if verdict(r) == "NO"]
    print()
    if failed:
        print(f"benchmarks that failed: {', '.join(failed)}")
    print(f"goals missed: {len(missed)} of {sum(1 for r in rows if verdict(r))}")
    print(run_summary(started))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
