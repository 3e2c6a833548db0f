"""What the benchmarks in hil/bench share: the report's header, tables and lines, /proc readings, a test subscriber.

Importing it puts the repository root on sys.path, so that the scripts run from a checkout where
the project is not installed: each script imports it ahead of the project's packages (it sorts
with the third-party imports, which come first). Linux only (/proc).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """The q-quantile of an already sorted list (nan when empty)."""
    if not sorted_xs:
        return float("nan")
    return sorted_xs[min(len(sorted_xs) - 1, int(q * len(sorted_xs)))]


# --- /proc readings -----------------------------------------------------------------------------


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (all its threads), or of one of its threads, in seconds (1/CLK_TCK resolution)."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    with open(path) as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kb(pid: int | str = "self") -> int:
    """VmRSS of a process in KiB (0 when it has none, e.g. a zombie)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# --- loopback MQTT ------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on loopback that nobody listens on, reserved for this process (see tests/helpers.py).

    Binding port 0 and releasing it leaves the port free for anyone until the server binds it: a bench run
    beside the tests (or its own connections' source ports) could take it. The tests' free_port reserves
    ports outside the ephemeral range with an flock that every test and bench process honours.
    """
    from tests.helpers import free_port as reserved_port  # late: the tests' helpers pull in paho and the drivers

    return reserved_port()


def subscribe(port: int, topic: str, on_message: Callable[[Any, Any, Any], None], timeout: float) -> mqtt.Client:
    """A paho client (MQTT 3.1.1, QoS 1, its network loop on a thread) subscribed to `topic` on the loopback
    broker at `port`; returns once the SUBACK came (TimeoutError after `timeout` s). Stop it with
    disconnect() and loop_stop()."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    subscribed = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}", protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(100)
    c.on_connect = lambda cl, *_: cl.subscribe(topic, qos=1)
    c.on_subscribe = lambda *_: subscribed.set()
    c.on_message = on_message
    c.connect("127.0.0.1", port, keepalive=60)
    c.loop_start()
    if not subscribed.wait(timeout):
        raise TimeoutError("the bench subscriber did not subscribe")
    return c
