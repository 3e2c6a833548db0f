"""Benchmark of Modbus TCP polling: the gateway line's software overhead per transaction against a bare pymodbus
client loop on the same loopback endpoint, and the gateway's CPU per 1,000 points polled.

Run from the repository root:  .venv/bin/python hil/bench/modbus_tcp_bench.py [--seconds N]
hil/bench/README.md says what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

# benchlib first: it puts the repository on sys.path for the imports below.
from benchlib import heading, note, print_header, print_table, record, run_summary, summary
from benchlib.children import serve_pipe
from benchlib.configs import parse_line
from benchlib.modbus import (
    FLAT_POLL,
    POINTS_COLUMNS,
    WARMUP,
    BenchBus,
    SimProcess,
    Window,
    bench_config,
    bus_window,
    devices_like,
    mixed_points,
    points_cells,
    register_points,
    sim_slaves,
)
from pymodbus.client import AsyncModbusTcpClient

from drivers.modbus.device import Device
from drivers.modbus.settings import LineSettings, TcpEndpoint
from hil.ports import free_port

DEFAULT_SECONDS = 6.0  # per measurement (two halves each for the bare loop and the line); a run takes ~4x this
READY_TIMEOUT = 20.0
#: The gateway's line may cost up to ~3x a bare pymodbus loop (it schedules, decodes and counts each transaction):
#: judged on bare / gateway for costs and gateway / bare for rates, so that every goal reads "at least".
OVERHEAD_GOAL = 0.33


# --- the endpoint, in its own process --------------------------------------------------------------


def serve_endpoint(config_text: str, dead_units: list[int], conn: Connection) -> None:
    """A benchlib Child target: a pymodbus Modbus TCP server with the bus's units at its tcp:// port."""
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(_serve_endpoint(parse_line(config_text), dead_units, conn))


async def _serve_endpoint(bus: LineSettings, dead_units: list[int], conn: Connection) -> None:
    from drivers.sim.modbus import ModbusSimulator

    if not isinstance(bus.port, TcpEndpoint):
        raise ValueError(f"bus {bus.name}: a Modbus TCP bench line needs a tcp:// port, not {bus.port}")
    sim = ModbusSimulator(bus.port, sim_slaves(bus, dead_units), framing="tcp")
    try:
        await sim.start()
        conn.send(("ok", None))
        await serve_pipe(conn, {})
    finally:
        await sim.stop()


def tcp_bench(name: str, devices: list[dict[str, object]]) -> BenchBus:
    """A one-bus config on a free loopback port, Modbus TCP framing (the default on tcp://)."""
    bench = bench_config(name, f"tcp://127.0.0.1:{free_port()}", devices)
    assert bench.cfg.mbap, "a tcp:// bus speaks Modbus TCP by default"
    return bench


# --- measuring ---------------------------------------------------------------------------------------


@dataclass
class Loop:
    """What a bare client loop did in one window."""

    seconds: float
    transactions: int
    cpu: float
    sim_cpu: float


async def bare_client(bench: BenchBus, sim: SimProcess, seconds: float) -> Loop:
    """A pymodbus client reading each device's planned blocks in turn, as fast as it goes: no scheduling,
    decoding or counting, the least a Modbus TCP poll can cost with this library."""
    assert isinstance(bench.cfg.port, TcpEndpoint)
    plans = [(dev.unit, [r for job in Device(dev, bench.cfg).jobs for r in job.requests]) for dev in bench.cfg.devices]
    client = AsyncModbusTcpClient(bench.cfg.port.host, port=bench.cfg.port.port, timeout=5, retries=0)
    if not await client.connect():
        raise RuntimeError(f"cannot connect to {bench.cfg.port}")
    calls = {
        "holding": client.read_holding_registers,
        "input": client.read_input_registers,
        "coil": client.read_coils,
        "discrete": client.read_discrete_inputs,
    }

    async def one_round() -> int:
        for unit, requests in plans:
            for r in requests:
                response = await calls[r.table](r.address, count=r.count, device_id=unit)
                if response.isError():
                    raise RuntimeError(f"unit {unit}: {response}")
        return sum(len(requests) for _, requests in plans)

    try:
        deadline = time.perf_counter() + WARMUP
        while time.perf_counter() < deadline:
            await one_round()
        wall, cpu, sim_cpu = time.perf_counter(), time.process_time(), sim.cpu_seconds()
        done = 0
        while time.perf_counter() - wall < seconds:
            done += await one_round()
        return Loop(time.perf_counter() - wall, done, time.process_time() - cpu, sim.cpu_seconds() - sim_cpu)
    finally:
        client.close()


async def alternating(bench: BenchBus, sim: SimProcess, seconds: float) -> tuple[Loop, Window]:
    """The bare loop and the gateway's line, each in two half windows taken in turn (bare, line, bare, line),
    so that a change in the machine's load during the run falls on both alike; the halves summed."""
    half = seconds / 2
    loops = [await bare_client(bench, sim, half)]
    windows = [await bus_window(bench, sim, half)]
    loops.append(await bare_client(bench, sim, half))
    windows.append(await bus_window(bench, sim, half))
    bare = Loop(*(sum(getattr(x, f) for x in loops) for f in ("seconds", "transactions", "cpu", "sim_cpu")))
    a, b = windows
    line = Window(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in dataclasses.fields(Window)})
    return bare, line


# --- figure 1: software overhead per transaction -------------------------------------------------------


async def figure_overhead(seconds: float) -> None:
    """tx/s and CPU per transaction of the gateway's line against a bare pymodbus loop, same endpoint, same run."""
    heading("1. Software overhead per Modbus TCP transaction (loopback pymodbus server, 10-register reads)")
    bench = tcp_bench("tcp-overhead", devices_like(2, register_points(10)))
    async with SimProcess(bench, target=serve_endpoint) as sim:
        bare, line = await alternating(bench, sim, seconds)
    rows = []
    for setup, s, tx, cpu, sim_cpu, timeouts in (
        ("bare pymodbus client loop", bare.seconds, bare.transactions, bare.cpu, bare.sim_cpu, 0),
        ("gateway line (ModbusBus)", line.seconds, line.transactions, line.cpu, line.sim_cpu, line.timeouts),
    ):
        n = max(tx, 1)
        rows.append(
            [
                setup,
                f"{s:.1f}",
                tx,
                timeouts,
                round(tx / s),
                1000 * s / n,
                1000 * cpu / n,
                f"{cpu / s:.0%}",
                1000 * sim_cpu / n,
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
            "CPU ms/tx (this process)",
            "CPU use",
            "server CPU ms/tx",
        ],
        rows,
    )
    note("Two units behind one endpoint, 10 holding registers each; the gateway polls them every 0.1 ms (always")
    note("overdue), the bare loop reads them in turn. The server runs in a child process: 'CPU' is the client's own.")
    bare_rate, line_rate = bare.transactions / bare.seconds, line.transactions / line.seconds
    bare_cpu, line_cpu = bare.cpu / max(bare.transactions, 1), line.cpu / max(line.transactions, 1)
    summary(
        f"the gateway's line makes {line_rate:,.0f} tx/s, {line_rate / bare_rate:.2f}x a bare pymodbus loop's "
        f"{bare_rate:,.0f}; it spends {1000 * line_cpu:.3f} ms CPU per transaction, {line_cpu / bare_cpu:.2f}x the "
        f"bare loop's {1000 * bare_cpu:.3f} ms (+{1e6 * (line_cpu - bare_cpu):.0f} us: scheduling, decoding, counting)"
    )
    record(
        "modbus-tcp",
        "Modbus TCP tx/s of the gateway's line, 10-register reads, loopback",
        round(line_rate),
        "tx/s",
        ratio=line_rate / bare_rate,
        versus=f"bare pymodbus client loop {bare_rate:,.0f} tx/s",
        goal=OVERHEAD_GOAL,
    )
    record(
        "modbus-tcp",
        "Modbus TCP gateway CPU per transaction",
        round(1000 * line_cpu, 4),
        "CPU ms",
        ratio=bare_cpu / line_cpu,
        versus=f"bare pymodbus loop {1000 * bare_cpu:.4f} ms (ratio bare / gateway)",
        goal=OVERHEAD_GOAL,
    )


# --- figure 2: CPU per 1,000 points ----------------------------------------------------------------------


async def figure_points(seconds: float) -> None:
    """Gateway CPU seconds per 1,000 points decoded from 100-point Modbus TCP devices polled flat out."""
    heading("2. Gateway CPU per 1,000 points polled over Modbus TCP (100-point devices of mixed types, flat out)")
    points = mixed_points()
    bench = tcp_bench("tcp-points", devices_like(2, points, poll=FLAT_POLL))
    reads = sum(len(job.requests) for job in Device(bench.cfg.devices[0], bench.cfg).jobs)
    async with SimProcess(bench, target=serve_endpoint) as sim:
        bare, w = await alternating(bench, sim, seconds)
    decoded = max(w.points, 1)
    # The bare loop reads the same blocks and decodes nothing: its CPU per round, spread over the points a
    # round carries, is what the points would cost if the gateway added nothing to pymodbus.
    bare_rounds = bare.transactions / (reads * len(bench.cfg.devices))
    bare_per_1000 = 1000 * bare.cpu / max(bare_rounds * len(points) * len(bench.cfg.devices), 1)
    gw_per_1000 = 1000 * w.cpu / decoded
    print_table(
        [*POINTS_COLUMNS, "bare loop, same reads"],
        [[*points_cells(bench, len(points), reads, w), bare_per_1000]],
    )
    note("types as modbus_bench.py's figure 3 (hil/bench/README.md). A point counts when its value reaches on_sample.")
    summary(
        f"{gw_per_1000:.4f} CPU s per 1,000 points ({1e3 * gw_per_1000:.1f} us/point), "
        f"{gw_per_1000 / bare_per_1000:.2f}x what the same reads cost a bare pymodbus loop; "
        f"one core would poll ~{w.points / max(w.cpu, 1e-9):,.0f} points/s"
    )
    record(
        "modbus-tcp",
        "Modbus TCP gateway CPU per 1,000 points polled",
        round(gw_per_1000, 4),
        "CPU s",
        ratio=bare_per_1000 / gw_per_1000,
        versus=f"bare pymodbus loop, same reads, no decoding: {bare_per_1000:.4f} CPU s (ratio bare / gateway)",
        goal=OVERHEAD_GOAL,
    )


# --- main ---------------------------------------------------------------------------------------------


async def run(seconds: float) -> None:
    """Every figure."""
    await figure_overhead(seconds)
    await figure_points(seconds)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, print every figure."""
    parser = argparse.ArgumentParser(description="Modbus TCP polling benchmark (see hil/bench/README.md).")
    parser.add_argument(
        "--seconds",
        type=float,
        default=DEFAULT_SECONDS,
        help=f"length of each measurement window (default {DEFAULT_SECONDS:g})",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    logging.basicConfig(level=logging.ERROR)
    import pymodbus

    started = time.monotonic()
    print_header(
        "Modbus TCP polling",
        {"pymodbus": pymodbus.__version__},
        [f"measurement windows {args.seconds:g} s; CPU = time.process_time() of this (client) process or the server's"],
        skews="every figure",
    )
    asyncio.run(run(args.seconds))
    print()
    print(run_summary(started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
