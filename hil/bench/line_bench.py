"""Benchmark of Modbus through the baud-accurate RS-485 line: achieved transactions/s against the line limit.

Run from the repository root:  .venv/bin/python hil/bench/line_bench.py [--seconds N] [--bauds 9600,115200]
hil/bench/README.md says what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import select
import selectors
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path

# benchlib first: it puts the repository on sys.path for the imports below.
from benchlib import heading, note, print_header, print_table, record, run_summary, summary
from modbus_bench import (
    FLAT_POLL,
    READY_TIMEOUT,
    WARMUP,
    BenchBus,
    Recorder,
    SimProcess,
    Snapshot,
    Window,
    bench_config,
    boiler_points,
    devices_like,
    parse_bus,
    plan_table,
    sim_slaves,
    stop_bus,
)

from drivers.modbus import budget
from drivers.modbus.bus import OPEN_TIMEOUT, ModbusBus, line_budget
from drivers.modbus.transport import ModbusLink
from drivers.sim.modbus import ModbusSimulator
from gateway.config import parse_config
from hil.line import Rs485Line

DEFAULT_SECONDS = 10.0  # per baud rate: two rates plus start-ups stay under ~30 s
DEFAULT_BAUDS = (9600, 115200)
FRAMING = {"bytesize": 8, "parity": "E", "stopbits": 1}  # 8E1, the Modbus default: 11 bits per character
DEVICES = 3  # boilers of modbus_bench figure 4: 6 points in 3 reads each
GOAL = 0.9  # achieved transactions/s over the line limit
PLAN_POLL = "1s"  # figure 3: the bench devices as a real config would poll them
#: Waits shorter than this are timed by select() in the line's process (see PreciseSelector).
PRECISE_BELOW = 0.002


# --- the line and its slaves, in their own process ------------------------------------------------


class PreciseSelector(selectors.EpollSelector):
    """epoll whose short waits end on time: asyncio's EpollSelector rounds a timeout up to whole milliseconds
    (epoll_wait counts milliseconds), which would stretch the line's per-character deadlines; select() on the
    epoll descriptor itself waits to the microsecond and returns when any registered file is ready."""

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """Wait as EpollSelector does; below PRECISE_BELOW seconds, precisely."""
        if timeout is not None and 0 < timeout < PRECISE_BELOW:
            select.select([self.fileno()], [], [], timeout)
            timeout = 0
        return super().select(timeout)


def precise_loop() -> asyncio.AbstractEventLoop:
    """An event loop on PreciseSelector."""
    return asyncio.SelectorEventLoop(PreciseSelector())


def serve_rs485(config_text: str, dead_units: list[int], conn: Connection) -> None:
    """Child process: an Rs485Line at the bus's port (its baud rate and framing) with pymodbus slaves behind it,
    on a PreciseSelector loop.

    Answers "stats" with (the line's clock, its LineStats as a dict); anything else, or EOF, stops it.
    """
    logging.basicConfig(level=logging.ERROR)
    with asyncio.Runner(loop_factory=precise_loop) as runner:
        runner.run(_serve_rs485(config_text, dead_units, conn))


def serve_rs485_default_loop(config_text: str, dead_units: list[int], conn: Connection) -> None:
    """serve_rs485 on asyncio's default loop (`--line-loop default`: what the rounding costs the line)."""
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(_serve_rs485(config_text, dead_units, conn))


LINE_LOOPS = {"precise": serve_rs485, "default": serve_rs485_default_loop}


async def _serve_rs485(config_text: str, dead_units: list[int], conn: Connection) -> None:
    bus = parse_bus(config_text)
    loop = asyncio.get_running_loop()
    line = Rs485Line(bus.port, baudrate=bus.baudrate, frame_format=f"{bus.bytesize}{bus.parity}{bus.stopbits}")
    await line.start()
    sim = ModbusSimulator(line.device_port, sim_slaves(bus, dead_units), baudrate=bus.baudrate)
    stop = asyncio.Event()

    def on_request() -> None:
        try:
            request = conn.recv()
        except EOFError:  # the parent is gone
            stop.set()
            return
        if request == "stats":
            conn.send((loop.time(), asdict(line.stats)))
        else:
            stop.set()

    try:
        await sim.start()
        conn.send("ready")
        loop.add_reader(conn.fileno(), on_request)
        await stop.wait()
        loop.remove_reader(conn.fileno())
    finally:
        await sim.stop()
        await line.stop()


# --- one baud rate ------------------------------------------------------------------------------


def line_config(baud: int, port: str, poll: str = FLAT_POLL) -> BenchBus:
    """The bench bus at `baud`: three boilers (polled flat out by default), 8E1, the bus's defaults otherwise."""
    return bench_config(f"line{baud}", port, devices_like(DEVICES, boiler_points(), poll), baudrate=baud, **FRAMING)


@dataclass
class LineRun:
    """One baud rate's measurement window, from the gateway's and from the line's side."""

    baud: int
    window: Window
    answered: int  # reads answered in the window
    response_s: float  # their request -> answer times, summed (the bus's own clock)
    bus_tx_s: float  # their transaction times by the budget (frames + two t3.5)
    line_wire_s: float  # the line's own count of the time it carried characters
    line_seconds: float  # the window on the line's clock
    short_gaps: int  # requests that began less than t3.5 after the line went quiet
    limit: float  # tx/s the line allows for this plan (see line_limit)
    t35: float


def line_limit(bench: BenchBus) -> float:
    """Transactions/s the wire allows for one round of the plan: each transaction is its request and response
    characters (11 bits each at 8E1) plus two t3.5 silences: one before the slave may answer, one before
    the next request. Slave processing within that turnaround and adapter latency cost nothing here."""
    b = line_budget(bench.cfg)
    return b.transactions / sum(b.cycle_seconds)


def response_totals(bus: ModbusBus) -> tuple[int, float]:
    """(answered reads, the sum of their response times) over every device so far."""
    devices = bus.devices.values()
    return sum(sum(d.stats.response_counts) for d in devices), sum(d.stats.response_sum_s for d in devices)


async def measure(baud: int, tmp: Path, seconds: float, line_loop: str = "precise") -> LineRun:
    """Poll the bench bus flat out through the line at `baud` and measure a steady window of `seconds`."""
    bench = line_config(baud, str(tmp / f"tty-line{baud}"))
    cfg = bench.cfg
    rec = Recorder(cfg)
    async with SimProcess(bench, target=LINE_LOOPS[line_loop]) as sim:
        # The pty takes no parity (this kernel refuses 8E1 on ptys); the bus times everything by the
        # configured 8E1, and so does the line.
        link = ModbusLink(
            cfg.port,
            baudrate=baud,
            parity="N",
            bytesize=cfg.bytesize,
            stopbits=cfg.stopbits,
            connect_timeout=OPEN_TIMEOUT,
        )
        bus = ModbusBus(cfg, rec.on_sample, rec.on_state, link=link)
        await bus.start()
        try:
            try:
                await asyncio.wait_for(rec.online.wait(), READY_TIMEOUT)
            except TimeoutError:
                raise RuntimeError(f"{baud} baud: not every device answered within {READY_TIMEOUT:.0f} s") from None
            await asyncio.sleep(WARMUP)
            first, first_resp, first_wire = Snapshot.take(bus, sim, rec), response_totals(bus), bus.stats.wire_seconds
            first_line = await sim.ask("stats")
            await asyncio.sleep(seconds)
            last, last_resp, last_wire = Snapshot.take(bus, sim, rec), response_totals(bus), bus.stats.wire_seconds
            last_line = await sim.ask("stats")
        finally:
            await stop_bus(bus)
    (t0, line0), (t1, line1) = first_line, last_line
    return LineRun(
        baud=baud,
        window=Window.between(first, last),
        answered=last_resp[0] - first_resp[0],
        response_s=last_resp[1] - first_resp[1],
        bus_tx_s=last_wire - first_wire,
        line_wire_s=line1["wire_seconds"] - line0["wire_seconds"],
        line_seconds=t1 - t0,
        short_gaps=line1["short_gaps"] - line0["short_gaps"],
        limit=line_limit(bench),
        t35=budget.t35(baud, budget.char_bits(cfg.bytesize, cfg.parity, cfg.stopbits)),
    )


# --- the report -----------------------------------------------------------------------------------


def report(runs: list[LineRun], headline: bool) -> None:
    """The throughput table, where each transaction's time goes, and (when `headline`) the suite's figures."""
    heading("1. Transactions/s through the line against the line limit (3 boilers polled flat out, 8E1)")
    rows: list[list[object]] = []
    for r in runs:
        w = r.window
        tx = max(w.transactions, 1)
        rate = w.transactions / w.seconds
        rows.append(
            [
                r.baud,
                f"{w.seconds:.1f}",
                w.transactions,
                w.timeouts,
                r.limit,
                rate,
                f"{rate / r.limit:.3f}",
                f"{r.line_wire_s / r.line_seconds:.0%}",
                r.short_gaps,
                1000 * w.cpu / tx,
                1000 * w.sim_cpu / tx,
            ]
        )
    print_table(
        [
            "baud",
            "window s",
            "transactions",
            "timeouts",
            "line limit tx/s",
            "achieved tx/s",
            "ratio",
            "wire busy",
            "short gaps",
            "gateway CPU ms/tx",
            "line+slaves CPU ms/tx",
        ],
        rows,
    )
    note("line limit: per round of the plan, every read's request and response characters at 11 bits plus two")
    note("t3.5 silences (the slave's turnaround before its answer, the gateway's gap before the next request);")
    note("the simulated slaves answer within the turnaround, so nothing else is owed to the protocol.")
    note("'wire busy': share of the window the line carried characters (its own count); 'short gaps': requests")
    note("the gateway began less than t3.5 after the line went quiet (must be 0). The line and the slaves run in")
    note("a child process (on the loop the header names); the gateway on asyncio's default loop, as deployed.")

    heading("2. Where a transaction's time goes (ms per transaction, means over the window)")
    rows = []
    for r in runs:
        w = r.window
        tx = max(w.transactions, 1)
        wall = w.seconds / tx
        ideal_response = r.bus_tx_s / max(r.answered, 1) - r.t35  # frames + the slave's turnaround
        response = r.response_s / max(r.answered, 1)
        between = wall - response
        rows.append(
            [
                r.baud,
                1000 * r.t35,
                1000 / r.limit,
                1000 * wall,
                1000 * ideal_response,
                1000 * response,
                1000 * r.t35,
                1000 * between,
                1000 * (wall - 1 / r.limit),
            ]
        )
    print_table(
        [
            "baud",
            "t3.5",
            "limit ms/tx",
            "achieved ms/tx",
            "response ideal",
            "response",
            "gap ideal",
            "gap",
            "lost",
        ],
        rows,
    )
    note("response: from handing the request to pymodbus to the answer's last byte (the bus's own clock); ideal:")
    note("request + response characters + the slave's t3.5 turnaround. gap: the rest, from that byte to the next")
    note("request handed to pymodbus: the bus's t3.5 silence and any lateness of it; ideal: t3.5. lost: achieved")
    note("minus limit ms/tx. Both clocks are the gateway's: pty hops and the line's own lateness fall into them.")
    for r in runs:
        ratio = r.window.transactions / r.window.seconds / r.limit
        verdict = "meets" if ratio >= GOAL else "MISSES"
        summary(
            f"{r.baud} baud 8E1: {r.window.transactions / r.window.seconds:.1f} tx/s of the line's "
            f"{r.limit:.1f} = {ratio:.3f} ({verdict} the >= {GOAL} goal)"
        )
        if not headline:
            continue
        record(
            "line",
            f"Modbus tx/s through the line, {r.baud} baud 8E1",
            round(r.window.transactions / r.window.seconds, 1),
            "tx/s",
            ratio=ratio,
            versus=f"line limit {r.limit:.1f} tx/s",
            goal=GOAL,
        )


def figure_plan(baud: int) -> None:
    """The bench devices' planned reads per poll cycle against one read per point (modbus_bench's figure 1)."""
    heading("3. Block planning of the bench devices: read transactions per poll cycle")
    # Polled every second here, so that the wire budget under the table reads as it would in a real config.
    cfg = parse_config(line_config(baud, "/dev/null", PLAN_POLL).text, filename="<bench>").config
    points, planned = plan_table(cfg)
    record(
        "line",
        "Modbus reads per poll cycle, 3 bench devices",
        planned,
        "tx/cycle",
        ratio=planned / points,
        versus=f"one read per point: {points} tx/cycle",
    )


# --- main ---------------------------------------------------------------------------------------


def parse_bauds(text: str) -> list[int]:
    """`--bauds`: comma-separated baud rates."""
    try:
        bauds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected baud rates like 9600,115200, got {text!r}") from None
    if not bauds or min(bauds) < 300:
        raise argparse.ArgumentTypeError(f"expected baud rates like 9600,115200, got {text!r}")
    return bauds


async def run(bauds: list[int], seconds: float, line_loop: str) -> list[LineRun]:
    """Measure every baud rate, one fresh line and bus each."""
    with tempfile.TemporaryDirectory(prefix="fieldgate-line-bench-") as tmp:
        return [await measure(baud, Path(tmp), seconds, line_loop) for baud in bauds]


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, print every figure."""
    parser = argparse.ArgumentParser(description="Modbus through the baud-accurate line (see hil/bench/README.md).")
    parser.add_argument(
        "--seconds",
        type=float,
        default=DEFAULT_SECONDS,
        help=f"measurement window per baud rate; a run takes ~this plus 2 s per rate (default {DEFAULT_SECONDS:g})",
    )
    parser.add_argument(
        "--bauds",
        type=parse_bauds,
        default=list(DEFAULT_BAUDS),
        help=f"baud rates to measure (default {','.join(map(str, DEFAULT_BAUDS))})",
    )
    parser.add_argument(
        "--line-loop",
        choices=sorted(LINE_LOOPS),
        default="precise",
        help="the line process's event loop: precise (default) or asyncio's default, to see what its rounding costs",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    logging.basicConfig(level=logging.ERROR)
    import pymodbus

    started = time.monotonic()
    print_header(
        "Modbus line",
        {"pymodbus": pymodbus.__version__},
        [
            f"measurement windows {args.seconds:g} s per baud rate; line process on the {args.line_loop} loop; "
            "gateway CPU = time.process_time() of this process"
        ],
        skews="every rate and CPU figure",
    )
    runs = asyncio.run(run(args.bauds, args.seconds, args.line_loop))
    report(runs, headline=args.line_loop == "precise")
    figure_plan(args.bauds[0])
    print()
    print(run_summary(started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
