"""`make bench`: every benchmark of hil/bench in one go, their headline figures in one table.

Each benchmark runs as its own process with the arguments below (shorter windows than their
defaults where a figure settles quickly) and writes its full report to var/bench/<time>/<name>.txt;
its headline figures come back through benchlib.record(). The table gives each figure, its ratio to
the reference measured in the same run where one exists, the goal, and whether it was met.

The suite knows which figures each benchmark owes (`Bench.expects`): a figure that was not recorded
(its benchmark crashed, timed out or skipped it) or was recorded as NaN (benchlib's convention for
"could not be measured") is a row marked "not measured" and counts as missed, so a broken benchmark
can never shrink the table into a pass. The exit code is 1 when any goal is missed, any figure is
not measured, or any benchmark failed (non-zero exit).

Run from the repository root:  .venv/bin/python hil/bench/suite.py [--only modbus,mcp] [--markdown]
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# benchlib first: it puts the repository on sys.path.
from benchlib import RESULTS_ENV, ROOT, loadavg, package_version, print_header, print_table, run_summary

HERE = Path(__file__).resolve().parent
#: Longest a benchmark may run before the suite kills it (its figures are then "not measured").
BENCH_TIMEOUT = 30 * 60.0
NOT_MEASURED = "not measured"
HOSTILE_ATTACKS = ("slowloris", "resync", "resync-pre", "nack-flood", "wrong-token", "pre-hello")
#: The attacks whose connections never pass HELLO: their oldest connection's age is a figure too.
HOSTILE_PRE_HELLO = ("slowloris", "resync-pre", "wrong-token", "pre-hello")


@dataclass(frozen=True)
class Bench:
    """One benchmark script, the arguments the suite gives it and the figures it owes the table.

    `expects`: figure names as record() spells them with these arguments; a name may be an fnmatch
    pattern ("write rate, * msgs per commit*") where the name carries a figure of the run itself.
    """

    name: str
    script: str
    args: tuple[str, ...] = ()
    expects: tuple[str, ...] = ()
    timeout: float = BENCH_TIMEOUT


def benches(out: Path) -> list[Bench]:
    """What the suite runs, in order: the quick, quiet ones first."""
    return [
        Bench(
            "gateway",
            "gateway_bench.py",
            expects=(
                "start-up, exec → READY=1 (median)",
                "start-up, exec → first value of every device (median)",
                "idle RSS, gateway process",
                "idle RSS, broker child",
                "RSS growth after warm-up (*",
                "steady RSS growth per message published (*",
            ),
        ),
        Bench(
            "line",
            "line_bench.py",
            expects=(
                "Modbus tx/s through the line, 9600 baud 8E1",
                "Modbus tx/s through the line, 115200 baud 8E1",
                "Modbus reads per poll cycle counted on the line, 3 bench devices",
            ),
        ),
        Bench(
            "modbus",
            "modbus_bench.py",
            expects=(
                "software tx/s over a pty (no baud timing), 10-register reads",
                "gateway CPU per 1,000 points polled",
                "live devices' cycles/s with a dead neighbour, paced (poll 50ms), once it is offline",
                "live devices' cycles/s with a dead neighbour, saturated (poll 0.1ms), once it is offline",
            ),
        ),
        Bench(
            "modbus-tcp",
            "modbus_tcp_bench.py",
            expects=(
                "Modbus TCP tx/s of the gateway's line, 10-register reads, loopback",
                "Modbus TCP gateway CPU per transaction",
                "Modbus TCP gateway CPU per 1,000 points polled",
            ),
        ),
        Bench(
            "server",
            "modbus_server_bench.py",
            expects=(
                "cache-hit latency p50, loopback",
                "cache-hit latency p99, loopback",
                *(
                    f"pass-through latency {q} over the line at 19200 8E1, {polling}"
                    for polling in ("without polling", "with polling")
                    for q in ("p50", "p99")
                ),
                "polled devices' cycles/s while 10 clients pass through",
                "polled devices' cycles/s while a client floods past max_queue",
                "polled devices' cycles/s while a client sends malformed frames, reconnecting",
                "polled devices' cycles/s while 10 clients read a dead device polled every 1h",
                "polled devices' cycles/s while 10 clients read a device answering 80 ms late polled every 1h",
            ),
        ),
        Bench(
            "spool",
            "spool_bench.py",
            ("--dir", str(out / "spool"), "--figures", "1,4,5", "--outbox-seconds", "10", "--profile", "never"),
            # Loose patterns: the spool's figures carry the run's own numbers (best batch, window) in their names.
            expects=("write rate*", "fsync*", "replay*"),
        ),
        Bench(
            "mcp",
            "mcp_bench.py",
            ("--clients", "100,1000,max", "--profile-at", "", "--compare-at", ""),
            expects=(
                "ACKed DATA frames/s, 100 clients x window 32",
                "ACKed DATA frames/s, 1,000 clients x window 32",
                "ACKed DATA frames/s, as many clients as descriptors allow*",
                "concurrent sessions held (limit: file descriptors)",
                "gateway RSS per idle session",
            ),
        ),
        Bench(
            "sparkplug",
            "sparkplug_bench.py",
            ("--short",),
            expects=(
                "gateway CPU per MCP DATA frame, MCP 1,000 frames/s, Sparkplug",
                "bytes on the wire per MCP DATA frame, MCP 1,000 frames/s, Sparkplug",
                "gateway CPU per field sample, shipped demo config, Sparkplug",
                "bytes on the wire per field sample, shipped demo config, Sparkplug",
                "connect → last DBIRTH, 100 devices x 50 points",
            ),
        ),
        Bench(
            "sink",
            "sink_bench.py",
            ("-n", "10000"),
            expects=("CPU per message, MQTT 5 sink",),
        ),
        Bench(
            "hostile",
            "hostile_bench.py",
            expects=(
                *(f"{a}: {f}" for a in HOSTILE_ATTACKS for f in ("p99 DATA->ACK", "RSS growth")),
                *(f"{a}: oldest pre-HELLO connection" for a in HOSTILE_PRE_HELLO),
            ),
        ),
    ]


def run(bench: Bench, out: Path, results: Path) -> tuple[int, float]:
    """Run one benchmark, its report to out/<name>.txt; (exit code, seconds); -9 when it overran its timeout."""
    env = {**os.environ, RESULTS_ENV: str(results)}
    started = time.monotonic()
    with (out / f"{bench.name}.txt").open("w") as report:
        # A session of its own, so that a benchmark that hangs is killed with every process it started.
        proc = subprocess.Popen(
            [sys.executable, str(HERE / bench.script), *bench.args],
            cwd=ROOT,
            env=env,
            stdout=report,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(bench.timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            report.write(f"\nkilled by the suite after {bench.timeout:g} s\n")
            code = -signal.SIGKILL
    return code, time.monotonic() - started


def _nan(x: object) -> bool:
    return isinstance(x, float) and math.isnan(x)


def measured(row: dict[str, Any]) -> bool:
    """Whether a figure has a value (and, when it is a ratio, a reference): NaN or no row at all is not measured."""
    value = row.get("value")
    if value is None or _nan(value):
        return False
    return not (row.get("ratio") is not None and _nan(row["ratio"]))


def verdict(row: dict[str, Any]) -> str:
    """Whether a figure met its goal: "yes", "NO", "NO (not measured)", or "" when it was measured and has none."""
    if not measured(row):
        return f"NO ({NOT_MEASURED})"
    if row["goal"] is None and row["most"] is None:
        return ""
    judged = row["ratio"] if row["ratio"] is not None else row["value"]
    ok = (row["goal"] is None or judged >= row["goal"]) and (row["most"] is None or judged <= row["most"])
    return "yes" if ok else "NO"


def missed(row: dict[str, Any]) -> bool:
    """A goal missed or a figure not measured."""
    return verdict(row).startswith("NO")


def goal_text(row: dict[str, Any]) -> str:
    """The goal as it reads in the table: ">= 0.9", "<= 10 fsync/s"."""
    unit = "" if row["ratio"] is not None else f" {row['unit']}".rstrip()

    def number(x: float) -> str:
        return f"{x:,.0f}" if float(x).is_integer() else f"{x:g}"

    parts = []
    if row["goal"] is not None:
        parts.append(f">= {number(row['goal'])}{unit}")
    if row["most"] is not None:
        parts.append(f"<= {number(row['most'])}{unit}")
    return ", ".join(parts)


def missing_row(bench: str, figure: str) -> dict[str, Any]:
    """The row of an expected figure that was never recorded."""
    return dict(bench=bench, figure=figure, value=None, unit="", ratio=None, versus="", goal=None, most=None)


def complete(bench: Bench, recorded: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every figure `bench` owes, in its order, recorded or not, then what it recorded that it did not declare;
    and the names of those undeclared rows (a renamed figure shows up twice: there and as not measured)."""
    rows: list[dict[str, Any]] = []
    used: set[int] = set()
    for pattern in bench.expects:
        hits = [(i, r) for i, r in enumerate(recorded) if i not in used and fnmatch.fnmatchcase(r["figure"], pattern)]
        if not hits:
            rows.append(missing_row(bench.name, pattern))
        for i, r in hits:
            used.add(i)
            rows.append(r)
    extra = [r for i, r in enumerate(recorded) if i not in used]
    return rows + extra, [f"{r['bench']}: {r['figure']}" for r in extra]


def load(results: Path) -> list[dict[str, Any]]:
    """The rows a benchmark recorded (none when it never got that far)."""
    return [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []


def table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[object]]]:
    """The suite's table: headers and rows."""
    headers = ["bench", "figure", "value", "unit", "ratio", "versus (same run)", "goal", "met"]
    cells: list[list[object]] = []
    for r in rows:
        value: object = NOT_MEASURED if r["value"] is None or _nan(r["value"]) else float(r["value"])
        ratio: object = float("nan") if r["ratio"] is None else float(r["ratio"])
        if _nan(ratio) and r["ratio"] is not None:
            ratio = NOT_MEASURED  # the reference could not be measured
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
    rows: list[dict[str, Any]] = []
    undeclared: list[str] = []
    for bench in chosen:
        print(f"  {bench.name:<8} {shlex.join([bench.script, *bench.args])}", flush=True)
        # A results file per benchmark: its rows are told apart by the process that wrote them.
        results = out / f"{bench.name}.jsonl"
        results.unlink(missing_ok=True)
        code, seconds = run(bench, out, results)
        status = "ok" if code == 0 else f"FAILED (exit {code}, see {bench.name}.txt)"
        print(f"  {'':<8} {seconds:.0f} s, {status}; load average {loadavg(1)}", flush=True)
        if code:
            failed.append(bench.name)
        own, extra = complete(bench, load(results))
        rows += own
        undeclared += extra
    headers, cells = table(rows)
    print()
    print_table(headers, cells, blank="", fill=(NOT_MEASURED,))
    if args.markdown:
        print()
        print_markdown(headers, cells)
    goals_missed = [r for r in rows if measured(r) and missed(r)]
    unmeasured = [r for r in rows if not measured(r)]
    with_goal = sum(1 for r in rows if measured(r) and verdict(r))
    print()
    if failed:
        print(f"benchmarks that failed: {', '.join(failed)}")
    if undeclared:
        print(f"recorded but not expected by the suite (add them to its Bench.expects): {'; '.join(undeclared)}")
    # Every row counts: one with a goal must meet it, one without must at least have been measured.
    print(
        f"missed: {len(goals_missed) + len(unmeasured)} of {len(rows)} figures "
        f"({len(goals_missed)} goals missed of {with_goal} judged, {len(unmeasured)} {NOT_MEASURED})"
    )
    print(run_summary(started))
    return 1 if failed or goals_missed or unmeasured else 0


if __name__ == "__main__":
    sys.exit(main())
