"""Benchmark of the Modbus driver: block planning, per-transaction overhead, CPU per point, dead-device cost.

Run from the repository root:  .venv/bin/python hil/bench/modbus_bench.py [--config FILE] [--seconds N]
hil/bench/README.md says what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# benchlib first: it puts the repository on sys.path for the imports below.
from benchlib import ROOT, heading, note, print_header, print_table, record, run_summary, summary
from benchlib.modbus import (
    BAUD,
    FLAT_POLL,
    POINTS_COLUMNS,
    Recorder,
    SimProcess,
    Window,
    bench_config,
    boiler_points,
    devices_like,
    flat_out,
    mixed_points,
    planned_reads,
    points_cells,
    register_points,
    stop_bus,
)

from drivers.modbus import budget
from drivers.modbus.bus import ModbusBus, line_budget
from drivers.modbus.device import PROBE_LINE_SHARE, Device
from drivers.modbus.settings import LineSettings
from gateway.config import load_config
from gateway.config.schema import Config
from gateway.config.settings import modbus_line
from gateway.config.units import parse_duration
from gateway.errors import ConfigError
from gateway.types import DeviceState
from hil.line import char_bits, t35

DEFAULT_CONFIG = ROOT / "config.yaml"
DEFAULT_SECONDS = 6.0  # per measurement window: 6.5 windows plus start-ups stay under ~60 s
PACED_POLL = "50ms"  # figure 4's unsaturated variant: the poll interval, not the line, sets the pace
GOAL = 0.95  # share of their rate live devices should keep with a dead unit on the line


# --- figure 1: planning ---------------------------------------------------------------------------


def per_point_budget(bus: LineSettings) -> budget.LineBudget:
    """The wire budget if every point were read by a request of its own."""
    bits = budget.char_bits(bus.bytesize, bus.parity, bus.stopbits)
    jobs: list[tuple[float, list[tuple[int, int]]]] = []
    for dev in bus.devices:
        groups: dict[float, list[tuple[int, int]]] = {}
        for p in dev.points:
            pair = (budget.read_request_bytes(), budget.read_response_bytes(p.table, p.codec.count))
            groups.setdefault(p.poll or dev.poll, []).append(pair)
        jobs.extend(groups.items())
    return budget.line_budget(jobs, bus.baudrate, bits)


def figure_plan(cfg: Config, source: str) -> None:
    """Planned reads per poll cycle against one request per point, and each bus's wire budget."""
    heading(f"1. Block planning: read transactions per poll cycle ({source})")
    plan_table(cfg)


def plan_table(cfg: Config) -> tuple[int, int]:
    """Print each device's points against its planned reads, and each bus's wire budget;
    returns (points, planned reads) per round of every device (0, 0 without polled points)."""
    rows: list[list[object]] = []
    points = planned = 0
    lines = [modbus_line(bus) for bus in cfg.modbus.buses]
    for bus in lines:
        for dev_cfg in bus.devices:
            jobs = Device(dev_cfg, bus).jobs
            n_reads = sum(len(job.requests) for job in jobs)
            n_points = len(dev_cfg.points)
            polls = ", ".join(f"{job.interval:g} s" for job in jobs)
            ratio = f"{n_points / n_reads:.2f}x" if n_reads else "-"
            rows.append([bus.name, dev_cfg.name, dev_cfg.unit, polls, n_points, n_reads, ratio])
            points += n_points
            planned += n_reads
    if not planned:
        note("no polled Modbus points in this config")
        return 0, 0
    print_table(["bus", "device", "unit", "poll", "points (= reads, 1 per point)", "planned reads", "fewer by"], rows)
    for bus in lines:
        if bus.mbap:
            note(f"bus {bus.name}: Modbus TCP, no serial wire to budget")
            continue
        b = line_budget(bus)
        flag = "  ** over the 80% warning threshold **" if b.overloaded else ""
        note(f"bus {bus.name}, planned: {b.describe()}{flag}")
        note(f"bus {bus.name}, one read per point would need {per_point_budget(bus).utilisation:.0%} of the line")
    summary(
        f"{planned} planned read transactions per round instead of {points} with one request per point: "
        f"{points / planned:.2f}x fewer ({1 - planned / points:.0%} fewer transactions)"
    )
    return points, planned


# --- figure 2: software overhead per transaction --------------------------------------------------

#: A read of 10 holding registers: request unit, function, address, count, CRC; answer unit, function,
#: byte count, 20 data bytes, CRC (Modbus application protocol 6.3).
READ10_REQUEST, READ10_RESPONSE = 8, 5 + 2 * 10


def wire_transaction(baud: int) -> float:
    """Seconds a 10-register read holds an 8E1 line by the spec: both frames' characters and two t3.5 silences.
    The bench's own arithmetic (hil/line.py's), not drivers/modbus/budget.py's: that is the code under test."""
    bits = char_bits(8, "E", 1)
    return (READ10_REQUEST + READ10_RESPONSE) * bits / baud + 2 * t35(baud, bits)


async def figure_overhead(tmp: Path, seconds: float) -> float:
    """Transactions/s, wall ms and gateway CPU ms per transaction over a pty; returns CPU s per transaction."""
    heading("2. Software overhead per transaction over a pty (no baud timing; every read is 10 holding registers)")
    runs = (
        ("2 devices, poll 0.1 ms (line never idle)", 2, FLAT_POLL, seconds),
        ("1 device, poll 1 ms (idles; for contrast)", 1, "1ms", seconds / 2),
    )
    rows: list[list[object]] = []
    windows: list[Window] = []
    for label, count, poll, length in runs:
        bench = bench_config(
            f"overhead{count}",
            str(tmp / f"tty-overhead{count}"),
            devices_like(count, register_points(10), poll),
            inter_request_delay=0,
        )
        w = await flat_out(bench, length)
        windows.append(w)
        tx = max(w.transactions, 1)
        rows.append(
            [
                label,
                f"{w.seconds:.1f}",
                w.transactions,
                w.timeouts,
                round(w.transactions / w.seconds),
                1000 * w.seconds / tx,
                1000 * w.cpu / tx,
                f"{w.cpu / w.seconds:.0%}",
                1000 * w.sim_cpu / tx,
            ]
        )
    print_table(
        [
            "setup",
            "window s",
            "transactions",
            "timeouts",
            "tx/s",
            "wall ms/tx",
            "gateway CPU ms/tx",
            "gateway CPU use",
            "simulator CPU ms/tx",
        ],
        rows,
    )
    note("inter_request_delay 0. Simulator and pty pump run in a child process: 'gateway CPU' is the bus alone.")
    note("wall ms/tx = one request/response round trip: gateway + simulator + pty, two processes in lock-step.")
    note("second row: fixed-rate scheduling puts a lone job's next cycle in the future, and asyncio's epoll wait")
    note("rounds up to whole milliseconds, so one device polled 'every 1 ms' measures that timer, not the software.")
    w = windows[0]
    tx = max(w.transactions, 1)
    rate = w.transactions / w.seconds
    limits = []
    for baud in (9600, 115200):
        t = wire_transaction(baud)
        limits.append(f"{rate * t:.0f}x a {baud}-baud 8E1 line ({t * 1000:.2f} ms/tx)")
    summary(
        f"{1000 * w.seconds / tx:.2f} ms per transaction end to end, of which {1000 * w.cpu / tx:.3f} ms "
        f"({w.cpu / tx:.2e} s) is gateway CPU; the software's rate is {' and '.join(limits)}"
    )
    fast = wire_transaction(115200)
    record(
        "modbus",
        "software tx/s over a pty (no baud timing), 10-register reads",
        round(rate),
        "tx/s",
        ratio=rate * fast,
        versus=f"computed 115200-baud 8E1 limit {1 / fast:.0f} tx/s = 1 / ((8 + 25) x 11 bits / 115200 + 2 x 1.75 ms)",
    )
    return w.cpu / tx


# --- figure 3: CPU per 1,000 points -----------------------------------------------------------------


async def figure_points(tmp: Path, seconds: float, cpu_per_tx: float | None) -> None:
    """Gateway CPU seconds per 1,000 points decoded from 100-point devices polled flat out."""
    heading("3. Gateway CPU per 1,000 points polled (100-point devices of mixed types, polled flat out)")
    points = mixed_points()
    bench = bench_config("points", str(tmp / "tty-points"), devices_like(2, points), inter_request_delay=0)
    reads = planned_reads(bench.cfg)
    w = await flat_out(bench, seconds)
    decoded = max(w.points, 1)
    cycles = max(w.cycles, 1)
    print_table(
        [*POINTS_COLUMNS, "gateway CPU use"],
        [[*points_cells(bench, len(points), reads, w), f"{w.cpu / w.seconds:.0%}"]],
    )
    note("types: int16 (scaled), uint16, uint32, string:8, bitfield, float32, int64, float64, int32 word-swapped,")
    note("coils, discrete inputs; poll 0.1 ms, inter_request_delay 0. A point counts when its value reaches on_sample")
    note("(a bitfield counts once, however many named bits it publishes). The simulator's CPU is not included.")
    beyond = (
        ""
        if cpu_per_tx is None
        else f"~{1e6 * (w.cpu / cycles - reads * cpu_per_tx) / len(points):.1f} us/point more than figure 2's "
        "per-transaction cost (decoding, bigger frames); "
    )
    summary(
        f"{1000 * w.cpu / decoded:.4f} CPU s per 1,000 points ({1e6 * w.cpu / decoded:.1f} us/point), "
        f"{beyond}one core would poll ~{w.points / max(w.cpu, 1e-9):,.0f} points/s"
    )
    record("modbus", "gateway CPU per 1,000 points polled", round(1000 * w.cpu / decoded, 4), "CPU s")


# --- figure 4: a dead device on the line ------------------------------------------------------------


@dataclass
class DeadRun:
    """One run of figure 4: when each live cycle happened, and what the dead device cost."""

    start: float
    end: float
    recorder: Recorder
    live: list[str]
    skipped: list[int]
    dead_transactions: int = 0
    dead_timeouts: int = 0
    dead_timeout_s: float = 0.0
    tx_to_offline: int = 0
    offline_after: float | None = None

    def rate(self, since: float = 0.0) -> float:
        """Mean cycles/s of the live devices, from `since` seconds into the run to its end."""
        a = self.start + since
        return sum(self.recorder.count(name, a, self.end) for name in self.live) / len(self.live) / (self.end - a)

    def slowest(self) -> float:
        """Cycles/s of the slowest live device over the whole run."""
        return min(self.recorder.count(name, self.start, self.end) for name in self.live) / (self.end - self.start)

    @property
    def dead_line_seconds(self) -> float:
        """Line time the dead unit held: each of its transactions waits out the full response timeout."""
        return self.dead_timeouts * self.dead_timeout_s


async def dead_run(tmp: Path, poll: str, seconds: float, with_dead: bool, tag: str) -> DeadRun:
    """Three live boilers (plus one silent unit when `with_dead`), measured for `seconds` from bus start."""
    devices = [{"name": f"live{u}", "unit": u, "poll": poll, "points": boiler_points()} for u in (1, 2, 3)]
    if with_dead:
        devices.append({"name": "dead4", "unit": 4, "poll": poll, "points": boiler_points()})
    bench = bench_config(f"dead-{tag}", str(tmp / f"tty-{tag}"), devices)
    rec = Recorder(bench.cfg)
    rec.expect_dead("dead4")
    tx_to_offline = 0

    def on_state(state: DeviceState) -> None:
        nonlocal tx_to_offline
        rec.on_state(state)
        if state.device == "dead4" and not state.online and not tx_to_offline:
            tx_to_offline = bus.devices["dead4"].stats.transactions

    async with SimProcess(bench, dead_units=[4]):
        bus = ModbusBus(bench.cfg, rec.on_sample, on_state)
        start = time.perf_counter()
        await bus.start()
        try:
            await asyncio.sleep(seconds)
            end = time.perf_counter()
        finally:
            await stop_bus(bus)
    live = [f"live{u}" for u in (1, 2, 3)]
    run = DeadRun(start, end, rec, live, [bus.devices[name].stats.skipped_cycles for name in live])
    if with_dead:
        dead = bus.devices["dead4"]
        first = dead.jobs[0].requests[0]  # a silent unit fails on the first read of every cycle
        run.dead_transactions = dead.stats.transactions
        run.dead_timeouts = dead.stats.timeouts
        run.dead_timeout_s = dead.timeout(first.table, first.count)
        run.tx_to_offline = tx_to_offline
        if "dead4" in rec.offline_at:
            run.offline_after = rec.offline_at["dead4"] - start
    return run


async def figure_dead(tmp: Path, seconds: float) -> None:
    """Cycles/s of three live devices without and with a fourth that never answers."""
    heading("4. Live devices' poll rate with and without a dead device on the same line")
    rows: list[list[object]] = []
    verdicts: list[str] = []
    timeout_s = saturated_rate = 0.0
    paced_plan = bench_config("budget", "/dev/null", devices_like(3, boiler_points(), PACED_POLL)).cfg
    paced_rate = 1 / parse_duration(PACED_POLL)
    for variant, poll in (("paced", PACED_POLL), ("saturated", FLAT_POLL)):
        base = await dead_run(tmp, poll, seconds, False, f"{variant}-base")
        dead = await dead_run(tmp, poll, seconds, True, f"{variant}-dead")
        timeout_s = dead.dead_timeout_s
        # Compare both runs over the same span: from when the dead unit was declared offline to the end.
        settle = dead.offline_after if dead.offline_after is not None else 0.0
        for label, run in (("3 live", base), ("3 live + 1 dead", dead)):
            is_dead = run is dead
            rows.append(
                [
                    variant,
                    poll,
                    label,
                    run.rate(),
                    run.slowest(),
                    run.rate(settle),
                    round(sum(run.skipped) / len(run.skipped)) if variant == "paced" else "-",
                    (
                        "-"
                        if not is_dead
                        else f"{run.dead_transactions} + 0"
                        if run.offline_after is None
                        else f"{run.tx_to_offline} + {run.dead_transactions - run.tx_to_offline}"
                    ),
                    f"{run.dead_line_seconds:.2f}" if is_dead else "-",
                    f"{run.offline_after:.2f}" if run.offline_after is not None else "-",
                ]
            )
        whole = dead.rate() / base.rate()
        figure = f"live devices' cycles/s with a dead neighbour, {variant} (poll {poll}), once it is offline"
        if dead.offline_after is None:
            after_text = "it was not declared offline within the window"
            detect = "never declared offline"
            # Not declared offline: there is no "once offline" span to measure. The row stays, as not measured
            # (a missed goal), so that a driver that never gives up on a dead unit cannot drop it from the table.
            record(
                "modbus",
                figure,
                float("nan"),
                "cycles/s",
                versus=f"the dead unit was not declared offline within {seconds:g} s",
                goal=GOAL,
            )
        else:
            after = dead.rate(settle) / base.rate(settle)
            after_text = f"{after:.3f}x once it is offline ({'meets' if after >= GOAL else 'MISSES'})"
            detect = f"{dead.tx_to_offline} until declared offline at {settle:.2f} s, then probes"
            record(
                "modbus",
                figure,
                round(dead.rate(settle), 1),
                "cycles/s",
                ratio=after,
                versus=f"without it: {base.rate(settle):.1f} cycles/s",
                goal=GOAL,
            )
        verdicts.append(
            f"{variant} (poll {poll}): with a dead unit the live devices keep {whole:.3f}x of their rate in the first "
            f"{seconds:g} s after start ({'meets' if whole >= GOAL else 'MISSES'} the >= {GOAL} goal), {after_text}. "
            f"It cost {dead.dead_transactions} transactions ({detect}) holding the line "
            f"{dead.dead_line_seconds:.2f} s = {dead.dead_line_seconds / seconds:.0%} of the window"
        )
        if variant == "paced" and base.rate() < GOAL * paced_rate:
            verdicts.append(
                f"NOTE: the paced baseline reached only {base.rate():.1f} of {paced_rate:.0f} cycles/s: "
                "the line was saturated, not paced by the poll interval"
            )
        if variant == "saturated":
            saturated_rate = base.rate()
    print_table(
        [
            "variant",
            "poll",
            "devices",
            "live cycles/s",
            "slowest",
            "after dead offline",
            "skipped/live dev",
            "dead tx (detect + probe)",
            "dead line s",
            "offline at s",
        ],
        rows,
    )
    tx_rate = saturated_rate * 3 * planned_reads(paced_plan)
    probe_wait = Device(paced_plan.devices[0], paced_plan).probe_backoff_start
    gap = t35(BAUD, char_bits(8, "N", 1))
    note("each run: a fresh line and bus, counted from bus start for the whole window (offline detection included);")
    note("'after dead offline': only from when the dead unit was declared offline, over the same span in both runs.")
    note("'live cycles/s': mean of the 3 live devices; 'slowest': the minimum; 'skipped': cycles not run.")
    note(
        f"each device: 6 points in 3 reads. Bus defaults at {BAUD} baud: retries {paced_plan.retries}, "
        f"offline after {paced_plan.offline_after} failed polls,"
    )
    note(f"inter_request_delay t3.5, derived timeout ({1000 * timeout_s:.0f} ms for the dead unit's 1st read);")
    note("'dead line s' = the dead unit's timeouts x that timeout. While a failed unit settles (one more timeout")
    note("before its next request) the live ones are polled; once offline it is probed with one try after")
    note(f"{probe_wait:.1f} s, then twice that ... (each probe a timeout: at most {PROBE_LINE_SHARE:.0%} of the line).")
    note(
        f"saturated baseline: {tx_rate:.0f} tx/s = {1000 / max(tx_rate, 1e-9):.2f} ms/tx, paced by the t3.5 gap "
        f"({1000 * gap:.2f} ms), not by the software (figure 2)."
    )
    wire = line_budget(paced_plan).utilisation
    note(f"pty only: on a real {BAUD}-baud line the paced plan alone would need {wire:.0%} of the wire.")
    for v in verdicts:
        summary(v)


# --- main ---------------------------------------------------------------------------------------


def header(seconds: float) -> None:
    """What ran where, so that the numbers can be compared later."""
    import pymodbus

    print_header(
        "Modbus",
        {"pymodbus": pymodbus.__version__},
        [f"measurement windows {seconds:g} s; CPU = time.process_time() of this (gateway) process or the simulator's"],
        skews="figures 2-4",
    )


async def run_pty_figures(seconds: float, figures: set[int]) -> None:
    """Figures 2-4 (those in `figures`): everything that needs a simulated line."""
    with tempfile.TemporaryDirectory(prefix="fieldgate-bench-") as tmp:
        cpu_per_tx = await figure_overhead(Path(tmp), seconds) if 2 in figures else None
        if 3 in figures:
            await figure_points(Path(tmp), seconds, cpu_per_tx)
        if 4 in figures:
            await figure_dead(Path(tmp), seconds)


def parse_figures(text: str) -> set[int]:
    """`--figures`: a comma-separated list of figure numbers 1-4."""
    try:
        figures = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected figure numbers like 1,4, got {text!r}") from None
    if not figures or not figures <= {1, 2, 3, 4}:
        raise argparse.ArgumentTypeError(f"figures are 1-4, got {text!r}")
    return figures


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, print every figure."""
    parser = argparse.ArgumentParser(description="Modbus driver benchmark (see hil/bench/README.md).")
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="config whose plan figure 1 shows (default: shipped config.yaml)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=DEFAULT_SECONDS,
        help=f"length of each measurement window; a run takes ~7.5x this plus start-ups (default {DEFAULT_SECONDS:g})",
    )
    parser.add_argument("--plan-only", action="store_true", help="print figure 1 only (no simulated line)")
    parser.add_argument(
        "--figures", type=parse_figures, default={1, 2, 3, 4}, help="which figures, e.g. 4 or 1,2 (default: all)"
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    # The dead unit's offline warning is expected here; keep the report clean.
    logging.basicConfig(level=logging.ERROR)
    try:
        cfg = load_config(args.config).config
    except ConfigError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        return 2
    started = time.monotonic()
    header(args.seconds)
    if 1 in args.figures:
        figure_plan(cfg, os.path.relpath(args.config))
    if not args.plan_only and args.figures - {1}:
        asyncio.run(run_pty_figures(args.seconds, args.figures))
    print()
    print(run_summary(started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
