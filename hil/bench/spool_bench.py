"""Benchmark of the SQLite spool (bridge/spool.py): write rate, FIFO drain rate, fsyncs and bytes at steady load.

Figures (200-byte payloads, topic "devNN/telemetry"):
1. Write rate: add() flat out with batches of 1 ... 1,000 messages (one committed transaction per
   add, synchronous=FULL). msg/s, fsyncs and bytes written per 1,000 messages.
2. FIFO drain: 100,000 messages stored, then take(n) + accept(ids) until empty. msg/s.
3. Steady load: 500 msg/s arriving, grouped into one add() per group-commit window (50 ms = 25
   messages, 100, 120 and 200 ms). fsyncs/s and bytes written per 1,000 messages, add() latency.

Every figure runs in a child process of its own on a fresh spool file, so /proc/self/io and the
fsync count belong to it alone. The spool counts its own fsyncs (a model of what SQLite does, see
bridge/spool_io.py); figure 3 also runs under `strace -c -e trace=fsync,fdatasync` when strace is
installed, and prints the syscalls it saw next to the spool's count. `bytes (spool)` is what
SQLite wrote (WAL appends + checkpoint copies); `bytes (kernel)` is /proc/self/io write_bytes, the
page cache the process dirtied for storage (filesystem journal and flash wear come on top).

Run from the repository root:  .venv/bin/python hil/bench/spool_bench.py [--dir DIR] [--seconds N]
Put DIR on the filesystem the state dir will live on: on tmpfs an fsync costs nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# benchlib first: it puts the repository on sys.path for the imports below.
from benchlib import package_version, percentile, print_header, run_summary

from bridge.buffer import entry_size
from bridge.spool import SQLiteSpool
from gateway.types import Message

PAYLOAD = 200
RATE = 500  # msg/s of the steady figure
WINDOWS = (0.05, 0.1, 0.12, 0.2)  # group-commit windows of the steady figure, seconds
WRITE_BATCHES = (1, 10, 25, 100, 1000)
DRAIN_BATCHES = (100, 1000)
DRAIN_FILL = 100_000
GOAL_WRITE = 20_000  # msg/s
GOAL_FSYNC = 10.0  # fsync/s at steady load
BIG = 10**12  # max_size and the like: the bench measures writes, not limits


def messages(n: int, start: int = 0) -> list[tuple[Message, int]]:
    """n (message, sampled_ms) pairs with 200-byte payloads."""
    now_ms = int(time.time() * 1000)
    return [(Message(f"dev{i % 50:02d}/telemetry", os.urandom(PAYLOAD)), now_ms + i) for i in range(start, start + n)]


def write_bytes() -> int:
    """Bytes this process has caused to be written to storage so far (/proc/self/io)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def open_spool(path: Path) -> SQLiteSpool:
    return SQLiteSpool(path, max_size=BIG, max_age=1e9, min_free_bytes=0)


# --- the phases, each run in a child process ----------------------------------------------------


def phase_write(path: Path, batch: int, seconds: float) -> dict[str, Any]:
    """Figure 1: add() flat out with `batch` messages per call."""
    spool = open_spool(path)
    items = messages(batch)
    base, io0, cpu0 = spool.stats(), write_bytes(), time.process_time()
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds:
        spool.add(items)
        n += batch
    wall = time.perf_counter() - t0
    end = spool.stats()
    result = {
        "msgs": n,
        "rate": n / wall,
        "cpu_us": (time.process_time() - cpu0) / n * 1e6,
        "fsyncs": end.fsyncs - base.fsyncs,
        "bytes": end.bytes_written - base.bytes_written,
        "kernel_bytes": write_bytes() - io0,
        "stored": end.bytes,
    }
    spool.close()
    return result


def phase_drain(path: Path, batch: int) -> dict[str, Any]:
    """Figure 2: take(batch) + accept until the spool is empty."""
    spool = open_spool(path)
    for start in range(0, DRAIN_FILL, 1000):
        spool.add(messages(1000, start))
    base, io0 = spool.stats(), write_bytes()
    t0 = time.perf_counter()
    n = 0
    while entries := spool.take(batch):
        spool.accept([e.id for e in entries])
        n += len(entries)
    wall = time.perf_counter() - t0
    end = spool.stats()
    spool.close()
    return {
        "msgs": n,
        "rate": n / wall,
        "commits": end.commits - base.commits,
        "fsyncs": end.fsyncs - base.fsyncs,
        "bytes": end.bytes_written - base.bytes_written,
        "kernel_bytes": write_bytes() - io0,
        "seconds": wall,
    }


def phase_steady(path: Path, window: float, seconds: float) -> dict[str, Any]:
    """Figure 3: RATE msg/s arriving, one add() per window."""
    spool = open_spool(path)
    batch = round(RATE * window)
    items = messages(batch)
    latencies: list[float] = []
    base, io0 = spool.stats(), write_bytes()
    t0 = time.perf_counter()
    k = 0
    while (k + 1) * window <= seconds:
        k += 1
        delay = t0 + k * window - time.perf_counter()  # the window closes, its messages are added
        if delay > 0:
            time.sleep(delay)
        a = time.perf_counter()
        spool.add(items)
        latencies.append(time.perf_counter() - a)
    wall = time.perf_counter() - t0
    end = spool.stats()
    spool.close()
    closed = spool.stats()  # the close's checkpoint included: what strace sees for the whole process
    latencies.sort()
    return {
        "msgs": k * batch,
        "rate": k * batch / wall,
        "seconds": wall,
        "commits": end.commits - base.commits,
        "fsyncs": end.fsyncs - base.fsyncs,
        "fsyncs_process": closed.fsyncs,
        "checkpoints": (end.fsyncs - base.fsyncs - (end.commits - base.commits)) // 2,
        "bytes": end.bytes_written - base.bytes_written,
        "kernel_bytes": write_bytes() - io0,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
    }


# --- the orchestrator ---------------------------------------------------------------------------


def child(phase: str, path: Path, strace_out: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run one phase in a fresh process (optionally under strace -c) and return its figures."""
    open_spool(path).close()  # create the file here: its schema commits are not the phase's
    cmd = [sys.executable, __file__, "--phase", phase, "--path", str(path), "--args", json.dumps(kwargs)]
    if strace_out is not None:
        cmd = ["strace", "-f", "--seccomp-bpf", "-c", "-e", "trace=fsync,fdatasync", "-o", str(strace_out), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def strace_syncs(path: Path) -> int:
    """fsync + fdatasync calls in an `strace -c` summary."""
    calls = 0
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts and parts[-1] in ("fsync", "fdatasync") and len(parts) >= 5:
            calls += int(parts[3])
    return calls


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding path."""
    best, kind = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            _, mount, fstype, *_ = line.split()
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    return f"{kind} on {best}"


def header(work: Path) -> None:
    """What ran where, so that the numbers can be compared later."""
    print_header(
        "spool",
        {"SQLite": sqlite3.sqlite_version, "sqlite-utils": package_version("sqlite-utils")},
        [
            f"spool files in {work} ({fs_type(work)}); messages: {PAYLOAD}-byte payload, "
            f"{entry_size(messages(1)[0][0])} bytes counted each"
        ],
    )


def per_k(value: float, msgs: int) -> str:
    return f"{value / msgs * 1000 / 1024:,.0f} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="where the spool files go (default: a temp dir)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each write-rate run")
    parser.add_argument("--steady-seconds", type=float, default=30.0, help="length of each steady-load run")
    parser.add_argument("--no-strace", action="store_true", help="do not cross-check fsyncs with strace")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--args", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        phases: dict[str, Callable[..., dict[str, Any]]] = {
            "write": phase_write,
            "drain": phase_drain,
            "steady": phase_steady,
        }
        print(json.dumps(phases[args.phase](args.path, **json.loads(args.args))))
        return

    work = Path(tempfile.mkdtemp(prefix="fieldgate-spool-bench-", dir=args.dir))
    use_strace = not args.no_strace and shutil.which("strace") is not None
    try:
        header(work)
        started = time.monotonic()
        print(f"\n1. Write rate: add() flat out for {args.seconds:g} s, one committed transaction per add()")
        print(
            f"{'msgs/add':>8} {'msg/s':>10} {'CPU µs/msg':>10} {'fsyncs/1k msgs':>15} "
            f"{'bytes/1k (spool)':>17} {'(kernel)':>10}"
        )
        best = 0.0
        for i, batch in enumerate(WRITE_BATCHES):
            r = child("write", work / f"write{i}.db", batch=batch, seconds=args.seconds)
            best = max(best, r["rate"]) if batch <= 100 else best
            print(
                f"{batch:>8} {r['rate']:>10,.0f} {r['cpu_us']:>10.1f} {r['fsyncs'] / r['msgs'] * 1000:>15.1f} "
                f"{per_k(r['bytes'], r['msgs']):>17} {per_k(r['kernel_bytes'], r['msgs']):>10}"
            )

        print(f"\n2. FIFO drain: {DRAIN_FILL:,} messages stored, then take(n) + accept() until empty")
        print(f"{'take(n)':>8} {'msg/s':>10} {'commits':>8} {'fsyncs':>7} {'bytes/1k (spool)':>17} {'(kernel)':>10}")
        for i, batch in enumerate(DRAIN_BATCHES):
            r = child("drain", work / f"drain{i}.db", batch=batch)
            print(
                f"{batch:>8} {r['rate']:>10,.0f} {r['commits']:>8} {r['fsyncs']:>7} "
                f"{per_k(r['bytes'], r['msgs']):>17} {per_k(r['kernel_bytes'], r['msgs']):>10}"
            )

        print(f"\n3. Steady load: {RATE} msg/s for {args.steady_seconds:g} s, one add() per group-commit window")
        print(
            f"{'window':>7} {'msgs/add':>8} {'msg/s':>6} {'fsync/s':>8} {'ckpts':>5} {'strace':>13} "
            f"{'bytes/1k (spool)':>17} {'(kernel)':>10} {'add p50':>8} {'p99':>7}"
        )
        steady: dict[float, float] = {}
        for i, window in enumerate(WINDOWS):
            trace = work / f"steady{i}.strace" if use_strace else None
            r = child("steady", work / f"steady{i}.db", trace, window=window, seconds=args.steady_seconds)
            steady[window] = r["fsyncs"] / r["seconds"]
            check = f"{strace_syncs(trace)}/{r['fsyncs_process']}" if trace else "-"
            print(
                f"{window * 1000:>5.0f}ms {round(RATE * window):>8} {r['rate']:>6.0f} {steady[window]:>8.1f} "
                f"{r['checkpoints']:>5} {check:>13} {per_k(r['bytes'], r['msgs']):>17} "
                f"{per_k(r['kernel_bytes'], r['msgs']):>10} "
                f"{r['p50_ms']:>6.2f}ms {r['p99_ms']:>5.2f}ms"
            )
        if use_strace:
            print("strace = fsync+fdatasync calls strace saw / the spool's own count, whole child process")

        print("\nGoals")
        print(
            f"- write rate >= {GOAL_WRITE:,} msg/s (batches <= 100): {best:,.0f} msg/s "
            f"({'met' if best >= GOAL_WRITE else 'NOT met'})"
        )
        for window, rate in steady.items():
            verdict = "met" if rate <= GOAL_FSYNC else "NOT met"
            print(f"- <= {GOAL_FSYNC:g} fsync/s at {RATE} msg/s, {window * 1000:.0f} ms window: {rate:.1f} ({verdict})")
        print(run_summary(started, averages=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
