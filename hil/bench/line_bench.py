"""Benchmark of Modbus through the baud-accurate RS-485 line: achieved transactions/s against the line limit.

The line limit is measured in the same run: a minimal pyserial client (no gateway, no pymodbus)
replays the very request frames the gateway sent, one at a time with a t3.5 silence after each
answer, through the same line process. The computed limit (the Modbus spec's arithmetic, done here
and not by drivers/modbus/budget.py, the module under test) is printed beside it. Reads per poll
cycle are counted on the line (the requests it carried), not taken from the planner.

Run from the repository root:  .venv/bin/python hil/bench/line_bench.py [--seconds N] [--bauds 9600,115200]
hil/bench/README.md says what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import select
import selectors
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import crcmod.predefined
import serial
from benchlib import heading, note, print_header, print_table, record, run_summary, summary

# benchlib first: it puts the repository on sys.path for the imports below.
from benchlib.children import serve_pipe
from benchlib.modbus import (
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
    parse_line,
    serial_path,
    sim_slaves,
    stop_bus,
)

from drivers.modbus.bus import OPEN_TIMEOUT, ModbusBus
from drivers.modbus.transport import ModbusLink
from drivers.sim.modbus import ModbusSimulator
from hil.line import Rs485Line, char_bits, t35

DEFAULT_SECONDS = 10.0  # per baud rate: two rates plus start-ups stay under ~30 s
DEFAULT_BAUDS = (9600, 115200)
FRAMING = {"bytesize": 8, "parity": "E", "stopbits": 1}  # 8E1, the Modbus default: 11 bits per character
DEVICES = 3  # boilers of modbus_bench figure 4: 6 points in 3 reads each
GOAL = 0.9  # achieved transactions/s over the raw client's through the same line
#: Reads per poll cycle may exceed one per register table per device (the least any plan can do for these
#: points) by this share: the stop cuts a cycle short per device, of the hundreds counted.
READS_SLACK = 1.02
RAW_WARMUP_TX = 20  # transactions the raw client makes before its window (pty buffers, first-call caches)
RAW_TIMEOUT = 1.0  # s the raw client waits for an answer before it counts an error
#: The least silence (s) after which the raw client takes the line as idle: before it starts, after a bad answer.
RAW_QUIET = 0.2
#: The raw client may exceed the computed limit by this factor at most (its window's clock against the line's);
#: beyond, it was not timing what the spec times, and its figure is no limit.
RAW_OVER_COMPUTED = 1.01
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
    """A Child target: an Rs485Line at the bus's port (its baud rate and framing) with pymodbus slaves behind it,
    on a PreciseSelector loop.

    Answers "stats" with (the line's clock, its LineStats as a dict) and "requests" with the frames it carried
    (and how often); "stop", or EOF, stops it.
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
    bus = parse_line(config_text)
    loop = asyncio.get_running_loop()
    line = Rs485Line(serial_path(bus), baudrate=bus.baudrate, frame_format=f"{bus.bytesize}{bus.parity}{bus.stopbits}")
    await line.start()
    sim = ModbusSimulator(line.device_port, sim_slaves(bus, dead_units), baudrate=bus.baudrate)

    async def stats(_: object) -> tuple[float, dict[str, Any]]:
        return loop.time(), asdict(line.stats)

    async def requests(_: object) -> dict[bytes, int]:
        return dict(line.requests)

    line.count_requests = True
    try:
        await sim.start()
        conn.send(("ok", None))
        await serve_pipe(conn, {"stats": stats, "requests": requests})  # until "stop", or EOF
    finally:
        await sim.stop()
        await line.stop()


# --- one baud rate ------------------------------------------------------------------------------


def line_config(baud: int, port: str, poll: str = FLAT_POLL) -> BenchBus:
    """The bench bus at `baud`: three boilers (polled flat out by default), 8E1, the bus's defaults otherwise."""
    return bench_config(f"line{baud}", port, devices_like(DEVICES, boiler_points(), poll), baudrate=baud, **FRAMING)


_modbus_crc = crcmod.predefined.mkCrcFun("modbus")
READ_REQUEST_BYTES = 8  # unit, function, address, count, CRC
READ_FUNCTIONS = (1, 2, 3, 4)  # coils, discrete inputs, holding registers, input registers


def response_length(request: bytes) -> int:
    """Bytes of the normal answer to a read request (Modbus application protocol 6.1-6.4): unit, function,
    byte count, the data, CRC; coils and discrete inputs pack 8 to a byte, registers take 2 bytes each."""
    function, count = request[1], int.from_bytes(request[4:6], "big")
    if function in (1, 2):
        return 5 + math.ceil(count / 8)
    if function in (3, 4):
        return 5 + 2 * count
    raise ValueError(f"not a read request: {request.hex()}")


def computed_limit(frames: list[bytes], baud: int, bits: int) -> float:
    """Transactions/s the spec allows for one round of these requests: each request's and answer's characters
    at `bits` each, plus two t3.5 silences (before the slave may answer, before the next request)."""
    seconds = sum((len(f) + response_length(f)) * bits / baud + 2 * t35(baud, bits) for f in frames)
    return len(frames) / seconds


@dataclass
class RawRun:
    """The minimal client's window through the line: the measured line limit."""

    transactions: int  # answered in the window, each checked (length, unit, function, byte count, CRC)
    seconds: float
    errors: int  # over the whole run (warm-up too): answers that did not come, or came wrong
    short_gaps: int  # the line's count over the whole run: must be 0, like the gateway's

    @property
    def rate(self) -> float:
        """Transactions/s; NaN when the window held none."""
        return self.transactions / self.seconds if self.transactions and self.seconds > 0 else float("nan")

    def fault(self, computed: float) -> str:
        """Why this run cannot be the line's limit ("" when it can): a client that was out of step with the
        line, cut a silence short, or went faster than the spec's arithmetic allows measured something else."""
        if self.errors:
            return f"{self.errors} bad answers"
        if not self.transactions:
            return "no transaction in its window"
        return off_the_wire(self.rate, computed, self.short_gaps)


def off_the_wire(rate: float, computed: float, short_gaps: int) -> str:
    """Why a rate through the line is not one the spec allows ("" when it is): requests begun before the t3.5
    silence had passed, or more transactions/s than the computed wire limit (then something else was timed)."""
    if short_gaps:
        return f"{short_gaps} short gaps"
    if not rate <= computed * RAW_OVER_COMPUTED:
        return f"{rate:.1f} tx/s, faster than the computed wire limit {computed:.1f}"
    return ""


def answer_ok(request: bytes, answer: bytes, length: int) -> bool:
    """Whether `answer` is the normal answer to the read `request`: its length, the request's unit and function,
    the byte count that length implies, a CRC that checks."""
    return len(answer) == length and answer[:2] == request[:2] and answer[2] == length - 5 and _modbus_crc(answer) == 0


def drain(ser: serial.Serial, quiet: float) -> int:
    """Read and throw away whatever arrives until nothing has for `quiet` seconds; the bytes thrown away."""
    timeout, ser.timeout = ser.timeout, quiet
    thrown = 0
    try:
        while chunk := ser.read(4096):  # returns after `quiet` s with what came, empty once nothing did
            thrown += len(chunk)
    finally:
        ser.timeout = timeout
    return thrown


def raw_transactions(
    ser: serial.Serial, baud: int, bits: int, frames: list[bytes], seconds: float, warmup: int = RAW_WARMUP_TX
) -> tuple[int, float, int]:
    """Replay `frames` in turn through an open port for `seconds`, each after the t3.5 silence that follows
    the previous answer: (good transactions in the window, window seconds, bad answers in the whole run).

    Only a client in step with the line measures it: the gateway's last answer may still be on its way
    when this starts, and a client that took its tail for the next answer would send each request while
    an answer was still arriving and save a t3.5 every time (faster than the wire). So it starts once the
    line has been quiet for a while, checks every answer, and after a bad one waits for quiet again and
    does not count it."""
    silence = t35(baud, bits)
    answers = [response_length(f) for f in frames]
    # Quiet long enough for the longest answer of these requests to have ended, many times over.
    longest = max(len(f) + n for f, n in zip(frames, answers, strict=True)) * bits / baud + 2 * silence
    quiet = max(RAW_QUIET, 4 * longest)
    errors = 0
    drain(ser, quiet)

    def transaction(k: int) -> bool:
        nonlocal errors
        i = k % len(frames)
        ser.write(frames[i])
        answer = ser.read(answers[i])
        if not answer_ok(frames[i], answer, answers[i]):
            errors += 1
            drain(ser, quiet)
            return False
        # The silence that ends the answer, counted from its last byte's arrival here: never shorter than
        # the line's own count, which starts when that byte left the wire.
        time.sleep(silence)
        return True

    for k in range(warmup):
        transaction(k)
    started = time.perf_counter()
    sent = done = 0
    while time.perf_counter() - started < seconds:
        done += transaction(sent)
        sent += 1
    return done, time.perf_counter() - started, errors


def raw_client(port: str, baud: int, bits: int, frames: list[bytes], seconds: float) -> tuple[int, float, int]:
    """`raw_transactions` on the line's gateway side, opened by pyserial. Blocking: run it in a thread.

    pyserial alone, no gateway and no pymodbus: the best a client can do through this line, to measure the
    gateway against. The pty takes no parity (see measure()); the line times the configured format."""
    with serial.Serial(port, baudrate=baud, parity="N", bytesize=8, stopbits=1, timeout=RAW_TIMEOUT) as ser:
        return raw_transactions(ser, baud, bits, frames, seconds)


@dataclass
class LineRun:
    """One baud rate's measurement window, from the gateway's and from the line's side, and the raw client's."""

    baud: int
    window: Window
    answered: int  # reads answered in the window
    response_s: float  # their request -> answer times, summed (the bus's own clock)
    line_wire_s: float  # the line's own count of the time it carried characters
    line_seconds: float  # the window on the line's clock
    short_gaps: int  # requests that began less than t3.5 after the line went quiet
    line_requests: int  # requests the line carried from the bus's start to its stop (its own count)
    device_cycles: int  # poll cycles whose values reached on_sample over the same time, all devices
    frames: list[bytes]  # the distinct requests the gateway sent, in the order first seen
    raw: RawRun | None  # None: the raw client could not run (see raw_error)
    raw_error: str
    computed: float  # tx/s by the spec's arithmetic for one round of `frames`
    t35: float

    @property
    def rate(self) -> float:
        """The gateway's transactions/s."""
        return self.window.transactions / self.window.seconds

    @property
    def raw_fault(self) -> str:
        """Why the raw client's figure is no line limit ("" when it is one)."""
        if self.raw is None:
            return f"could not run: {self.raw_error}"
        return self.raw.fault(self.computed)

    @property
    def limit(self) -> float:
        """The measured line limit (the raw client's rate), NaN when it could not be measured or is no limit."""
        return self.raw.rate if self.raw and not self.raw_fault else float("nan")

    @property
    def fault(self) -> str:
        """Why the gateway's ratio to the line limit is not measured ("" when it is)."""
        if self.raw_fault:
            return f"the raw client's figure is no line limit: {self.raw_fault}"
        gateway = off_the_wire(self.rate, self.computed, self.short_gaps)
        return f"the gateway's figure is not one the line allows: {gateway}" if gateway else ""

    @property
    def ratio(self) -> float:
        """The gateway's rate over the line limit, NaN when not measured (see `fault`)."""
        return float("nan") if self.fault else self.rate / self.limit

    @property
    def reads_per_cycle(self) -> float:
        """Requests the line carried per poll cycle of all the devices."""
        return self.line_requests / (self.device_cycles / DEVICES) if self.device_cycles else float("nan")


async def measure(baud: int, tmp: Path, seconds: float, line_loop: str = "precise") -> LineRun:
    """Poll the bench bus flat out through the line at `baud` and measure a steady window of `seconds`; then
    the raw client through the same line for as long."""
    bench = line_config(baud, str(tmp / f"tty-line{baud}"))
    cfg = bench.cfg
    bits = char_bits(cfg.bytesize, cfg.parity, cfg.stopbits)
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
            first, first_resp = Snapshot.take(bus, sim, rec), response_totals(bus)
            first_line = await sim.ask("stats")
            await asyncio.sleep(seconds)
            last, last_resp = Snapshot.take(bus, sim, rec), response_totals(bus)
            last_line = await sim.ask("stats")
        finally:
            await stop_bus(bus)
        # Counted over the bus's whole run: the requests of a cycle the stop cut short are the only ones
        # without their cycle, at most a cycle's worth per device (READS_SLACK covers them).
        _, whole_run = await sim.ask("stats")
        cycles = sum(len(times) for times in rec.cycles.values())
        # The read requests (8 bytes, functions 1-4): all the bench's devices send, anything else is not replayed.
        frames = [f for f in (await sim.ask("requests")) if len(f) == READ_REQUEST_BYTES and f[1] in READ_FUNCTIONS]
        raw: RawRun | None = None
        raw_error = "" if frames else "the gateway sent no read request to replay"
        try:
            if not frames:
                raise ValueError(raw_error)
            before = await sim.ask("stats")
            done, raw_s, errors = await asyncio.to_thread(raw_client, cfg.port, baud, bits, frames, seconds)
            after = await sim.ask("stats")
            raw = RawRun(done, raw_s, errors, after[1]["short_gaps"] - before[1]["short_gaps"])
        except (OSError, ValueError, serial.SerialException) as exc:
            raw_error = f"{type(exc).__name__}: {exc}"
    (t0, line0), (t1, line1) = first_line, last_line
    return LineRun(
        baud=baud,
        window=Window.between(first, last),
        answered=last_resp[0] - first_resp[0],
        response_s=last_resp[1] - first_resp[1],
        line_wire_s=line1["wire_seconds"] - line0["wire_seconds"],
        line_seconds=t1 - t0,
        short_gaps=line1["short_gaps"] - line0["short_gaps"],
        line_requests=whole_run["frames_to_device"],
        device_cycles=cycles,
        frames=frames,
        raw=raw,
        raw_error=raw_error,
        computed=computed_limit(frames, baud, bits) if frames else float("nan"),
        t35=t35(baud, bits),
    )


def response_totals(bus: ModbusBus) -> tuple[int, float]:
    """(answered reads, the sum of their response times) over every device so far."""
    devices = bus.devices.values()
    return sum(sum(d.stats.response_counts) for d in devices), sum(d.stats.response_sum_s for d in devices)


# --- the report -----------------------------------------------------------------------------------


def report(runs: list[LineRun], headline: bool) -> None:
    """The throughput table, where each transaction's time goes, reads per cycle, and the suite's figures."""
    heading("1. Transactions/s through the line against the line limit (3 boilers polled flat out, 8E1)")
    rows: list[list[object]] = []
    for r in runs:
        w = r.window
        tx = max(w.transactions, 1)
        rows.append(
            [
                r.baud,
                f"{w.seconds:.1f}",
                w.transactions,
                w.timeouts,
                r.short_gaps,
                r.rate,
                r.raw.rate if r.raw else float("nan"),
                r.ratio,
                r.computed,
                (r.raw.rate if r.raw else float("nan")) / r.computed,
                f"{r.line_wire_s / r.line_seconds:.0%}",
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
            "short gaps",
            "gateway tx/s",
            "raw tx/s",
            "ratio",
            "computed tx/s",
            "raw/computed",
            "wire busy",
            "gateway CPU ms/tx",
            "line+slaves CPU ms/tx",
        ],
        rows,
        blank="-",
    )
    note("raw tx/s: the measured line limit. A minimal pyserial client (no gateway, no pymodbus) replays the distinct")
    note("requests the gateway sent, in turn, through the same line process right after the gateway's window, for as")
    note("long; it starts once the line has been quiet (the gateway's last answer may still be arriving), checks each")
    note("answer (length, unit, function, byte count, CRC), sleeps t3.5 after it before the next request, and after a")
    note("bad one waits for quiet again. ratio = gateway tx/s / raw tx/s, blank when the raw figure is no limit: a bad")
    note("answer or a short gap anywhere in its run, or a rate above the computed one (it timed something else);")
    note("blank too when the gateway's own figure had a short gap or beat the computed rate.")
    note("computed: the Modbus spec's arithmetic for one round of those requests, done by this bench:")
    note("each request's and answer's characters x 11 bits / baud + 2 x t3.5 (3.5 chars; 1.75 ms above 19200 baud).")
    note("'short gaps': requests begun less than t3.5 after the line went quiet (the line's count; must be 0, so that")
    note("no rate is bought by cutting the silence). 'wire busy': share of the window the line carried characters.")
    note("The line and the slaves run in a child process (on the loop the header names); the gateway on asyncio's")
    note("default loop, as deployed.")
    for r in runs:
        if r.fault:
            note(f"{r.baud} baud: not measured: {r.fault}")

    heading("2. Where a transaction's time goes (ms per transaction, means over the window)")
    rows = []
    for r in runs:
        w = r.window
        tx = max(w.transactions, 1)
        wall = w.seconds / tx
        response = r.response_s / max(r.answered, 1)
        between = wall - response
        rows.append(
            [
                r.baud,
                1000 * r.t35,
                1000 / r.computed,
                1000 / r.limit,
                1000 * wall,
                1000 * response,
                1000 * between,
                1000 * (wall - 1 / r.limit),
            ]
        )
    print_table(
        ["baud", "t3.5", "computed ms/tx", "raw ms/tx", "gateway ms/tx", "response", "gap", "lost"],
        rows,
        blank="-",
    )
    note("response: from handing the request to pymodbus to the answer's last byte (the bus's own clock); gap: the")
    note("rest, from that byte to the next request handed to pymodbus: the bus's t3.5 silence and any lateness of it.")
    note("lost: gateway minus raw ms/tx. The gateway's clocks include pty hops and the line's own lateness.")

    heading("3. Read requests per poll cycle, counted on the line (3 bench devices, 6 points each)")
    cfg = line_config(runs[0].baud, "/dev/null").cfg if runs else None
    n_points = sum(len(d.points) for d in cfg.devices) if cfg else 0
    least = sum(len({p.table for p in d.points}) for d in cfg.devices) if cfg else 0
    rows = [[r.baud, r.line_requests, r.device_cycles, r.reads_per_cycle, n_points, least] for r in runs]
    print_table(
        ["baud", "requests on the line", "device cycles", "reads per cycle", "one per point", "one per table"],
        rows,
        blank="-",
    )
    note("requests: frames the line carried from the gateway from the bus's start to its stop (the line's own count);")
    note("device cycles: cycles whose values reached on_sample over that time, the 3 devices together; reads per")
    note("cycle = requests / (device cycles / 3). The stop may cut a cycle short: its requests count, its values not.")
    note("one per table: the least any plan can do here (a device's points in one register table need one read at")
    note("least); one per point: what no block planning would cost.")

    for r in runs:
        if r.fault:
            summary(
                f"{r.baud} baud 8E1: {r.rate:.1f} tx/s, NOT MEASURED against the line limit (a missed goal): {r.fault}"
            )
        else:
            verdict = "meets" if r.ratio >= GOAL else "MISSES"
            summary(
                f"{r.baud} baud 8E1: {r.rate:.1f} tx/s of the raw client's {r.limit:.1f} through the same line = "
                f"{r.ratio:.3f} ({verdict} the >= {GOAL} goal); computed limit {r.computed:.1f} tx/s"
            )
        if not headline:
            continue
        record(
            "line",
            f"Modbus tx/s through the line, {r.baud} baud 8E1",
            round(r.rate, 1),
            "tx/s",
            ratio=r.ratio,
            versus=f"raw pyserial client {r.limit:.1f} tx/s (computed {r.computed:.1f})"
            if not r.fault
            else r.fault[:90],
            goal=GOAL,
        )
    if headline and runs:
        # The run with the most cycles: a cycle cut short by the stop weighs least there.
        best = max(runs, key=lambda r: r.device_cycles)
        record(
            "line",
            "Modbus reads per poll cycle counted on the line, 3 bench devices",
            round(best.reads_per_cycle, 2),
            "tx/cycle",
            ratio=best.reads_per_cycle / n_points if n_points else float("nan"),
            versus=f"computed from the config: one read per point {n_points} tx/cycle (one per table {least})",
            most=round(READS_SLACK * least / n_points, 3) if n_points else None,
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
    print()
    print(run_summary(started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
