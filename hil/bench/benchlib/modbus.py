"""A Modbus line for the benches: one-bus configs with the bench devices' point sets, the simulated line and
its slaves in a child process (so that CPU figures are the gateway's alone), and the clocks and counters of
a running bus."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from drivers.modbus.bus import ModbusBus
from drivers.modbus.device import Device
from drivers.modbus.settings import LineSettings, PointSettings
from drivers.sim.line import VirtualLine
from drivers.sim.modbus import ModbusSimulator, SimPoint, SimSlave
from drivers.sim.waves import Wave
from gateway.types import DeviceState, Sample

from .children import Child, serve_pipe
from .configs import config, dump, holding_registers, modbus_line, parse_line

BAUD = 19200  # the shipped config's rate; on a pty it only sets t3.5 and the derived timeouts
WARMUP = 0.5  # seconds after the first answers, so imports and first-call caches are paid
READY_TIMEOUT = 20.0
# Far below one transaction's time, and with two or more devices one job is always overdue
# while another is polled, so the line never waits for the schedule.
FLAT_POLL = "0.1ms"
STOP_RECANCEL = 0.5  # seconds to wait for bus.stop() before cancelling its task again


# --- configs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchBus:
    """A one-bus config: its YAML text (which the simulator process re-reads) and the validated bus."""

    text: str
    cfg: LineSettings


def bench_config(name: str, port: str, devices: list[dict[str, Any]], **bus: Any) -> BenchBus:
    """A one-bus config written as YAML and validated exactly like a user's file."""
    text = dump(config(modbus=[modbus_line(name, port, devices, **{"baudrate": BAUD, "parity": "N", **bus})]))
    return BenchBus(text, parse_line(text))


def register_points(count: int) -> list[dict[str, Any]]:
    """`count` uint16 holding registers in a row: one read of `count` registers."""
    return holding_registers(count)


def mixed_points() -> list[dict[str, Any]]:
    """100 points of every type: 54 holding, 26 input, 10 coils, 10 discrete inputs (4 planned reads)."""
    points: list[dict[str, Any]] = []

    def add(table: str, prefix: str, n: int, start: int, width: int, **kw: Any) -> int:
        for i in range(n):
            points.append({"name": f"{prefix}{i}", "table": table, "address": start + i * width, **kw})
        return start + n * width

    at = add("holding", "temp", 20, 0, 1, type="int16", scale=0.1)
    at = add("holding", "count", 20, at, 1, type="uint16")
    at = add("holding", "energy", 10, at, 2, type="uint32")
    at = add("holding", "label", 2, at, 4, type="string:8")
    add("holding", "status", 2, at, 1, type="bitfield", bits={0: "run", 1: "fault", 2: "remote"})
    at = add("input", "flow", 15, 0, 2, type="float32")
    at = add("input", "total", 4, at, 4, type="int64")
    at = add("input", "precise", 2, at, 4, type="float64")
    add("input", "swapped", 5, at, 2, type="int32", word_order="little")
    add("coil", "relay", 10, 0, 1)
    add("discrete", "door", 10, 0, 1)
    return points


def boiler_points() -> list[dict[str, Any]]:
    """A small boiler controller: 6 points in 3 planned reads (one coil, an input block, a holding block)."""
    return [
        {"name": "temperature", "table": "input", "address": 0, "type": "int16", "scale": 0.1},
        {"name": "pressure", "table": "input", "address": 2, "type": "float32"},
        {"name": "starts", "table": "input", "address": 10, "type": "uint32"},
        {"name": "status", "table": "holding", "address": 20, "type": "bitfield", "bits": {0: "running", 3: "alarm"}},
        {"name": "setpoint", "table": "holding", "address": 30, "type": "int16", "scale": 0.1},
        {"name": "enable", "table": "coil", "address": 0},
    ]


def devices_like(count: int, points: list[dict[str, Any]], poll: str = FLAT_POLL) -> list[dict[str, Any]]:
    """`count` identical devices on units 1..count."""
    return [{"name": f"d{u}", "unit": u, "poll": poll, "points": points} for u in range(1, count + 1)]


def serial_path(bus: LineSettings) -> str:
    """The serial device path of a bench line (the benches' lines are never Modbus TCP)."""
    if not isinstance(bus.port, str):
        raise ValueError(f"bus {bus.name}: a bench line is a serial path, not {bus.port}")
    return bus.port


def planned_reads(bus: LineSettings) -> int:
    """Read transactions one round of the first device's plan takes."""
    return sum(len(job.requests) for job in Device(bus.devices[0], bus).jobs)


# --- the simulated line, in its own process ------------------------------------------------------


def sim_wave(point: PointSettings) -> Wave:
    """A moving value that fits the point's type, so every read decodes something real."""
    kind = point.codec.type
    if kind == "bool":
        return Wave(kind="toggle", period=0.5)
    if kind == "bitfield":
        return Wave(kind="bits", period=0.5)
    if kind == "string":
        return Wave(value="BENCH")
    if kind.startswith("uint"):
        return Wave(kind="sine", min=0, max=1000, period=10)
    return Wave(kind="sine", min=-50, max=50, period=10)


def sim_slaves(bus: LineSettings, dead_units: Sequence[int]) -> list[SimSlave]:
    """One simulated slave per configured device, holding that device's points."""
    return [
        SimSlave(
            dev.unit,
            [SimPoint(p.name, p.table, p.address, p.codec, sim_wave(p)) for p in dev.points],
            dead=dev.unit in dead_units,
        )
        for dev in bus.devices
    ]


def serve_line(config_text: str, dead_units: list[int], conn: Connection) -> None:
    """A Child target: a virtual line at the bus's port with its slaves, until the orchestrator says stop."""
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(_serve_line(parse_line(config_text), dead_units, conn))


async def _serve_line(bus: LineSettings, dead_units: list[int], conn: Connection) -> None:
    line = VirtualLine(serial_path(bus))
    line.start()
    sim = ModbusSimulator(line.device_port, sim_slaves(bus, dead_units), baudrate=bus.baudrate)
    try:
        await sim.start()
        conn.send(("ok", None))
        await serve_pipe(conn, {})  # until "stop", or EOF when the orchestrator is gone
    finally:
        await sim.stop()
        line.close()


#: A Child target that serves a bench bus: (bus config YAML, dead units, its end of the pipe).
ServeFn = Callable[[str, list[int], Connection], None]


class SimProcess:
    """One bus's simulated line and slaves in a benchlib Child, so that our CPU figures are the gateway's alone.

    `target` runs in the child (default `serve_line`, a pty pair without timing); it answers once its slaves
    answer, then serves the requests `ask` sends until it is stopped.
    """

    def __init__(self, bench: BenchBus, dead_units: Sequence[int] = (), target: ServeFn = serve_line) -> None:
        self._start = (f"sim-{bench.cfg.name}", target, bench.text, list(dead_units))
        self._child: Child | None = None

    async def __aenter__(self) -> SimProcess:
        name, target, *args = self._start
        self._child = Child(name, target, *args)
        await asyncio.to_thread(self._child.wait, READY_TIMEOUT, "start")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._child is not None:
            await asyncio.to_thread(self._child.stop, 10)

    async def ask(self, request: str) -> Any:
        """Send the child a request its `target` answers, and wait for the answer."""
        assert self._child is not None
        return await asyncio.to_thread(self._child.call, request, None, READY_TIMEOUT)

    def cpu_seconds(self) -> float:
        """User + system CPU the child has used so far (Linux /proc, 1/CLK_TCK resolution)."""
        assert self._child is not None
        return self._child.cpu()


# --- measuring a running bus ----------------------------------------------------------------------


async def stop_bus(bus: ModbusBus) -> None:
    """bus.stop(), cancelling the line's task again until it really ends."""
    # On Python 3.11 one cancel can be lost: pymodbus awaits each response with asyncio.wait_for,
    # which swallows a cancel that lands as the response arrives (CPython gh-86296, fixed in 3.12);
    # stop() then waits forever on a bus that keeps polling.
    stopping = asyncio.ensure_future(bus.stop())
    while True:
        done, _ = await asyncio.wait({stopping}, timeout=STOP_RECANCEL)
        if done:
            stopping.result()
            return
        task = bus._task  # private, but there is no public way around the lost cancel
        if task is not None:
            task.cancel()


class Recorder:
    """on_sample/on_state callbacks that note when each cycle's values and each state change arrived."""

    def __init__(self, bus: LineSettings) -> None:
        self.cycles: dict[str, list[float]] = {d.name: [] for d in bus.devices}
        self.points = 0
        self.offline_at: dict[str, float] = {}
        self.online = asyncio.Event()
        self._want_online = {d.name for d in bus.devices}
        # A bitfield publishes each named bit as <point>.<bit>; count it once, as the one point it is.
        self._point_of: dict[str, dict[str, str]] = {}
        for dev in bus.devices:
            keys: dict[str, str] = {}
            for p in dev.points:
                if p.codec.type == "bitfield":
                    keys.update({f"{p.name}.{bit}": p.name for _, bit in p.codec.bits})
                else:
                    keys[p.name] = p.name
            self._point_of[dev.name] = keys

    def expect_dead(self, name: str) -> None:
        """Do not wait for this device to come online."""
        self._want_online.discard(name)

    def on_sample(self, sample: Sample) -> None:
        """Timestamp the cycle and count the points it decoded."""
        self.cycles[sample.device].append(time.perf_counter())
        keys = self._point_of[sample.device]
        self.points += len({keys[k] for k in sample.values})

    def on_state(self, state: DeviceState) -> None:
        """Note when devices come online and go offline."""
        if state.online:
            self._want_online.discard(state.device)
            if not self._want_online:
                self.online.set()
        else:
            self.offline_at.setdefault(state.device, time.perf_counter())

    def count(self, device: str, start: float, end: float) -> int:
        """Cycles of one device that delivered values in [start, end)."""
        return sum(1 for t in self.cycles[device] if start <= t < end)


@dataclass
class Snapshot:
    """Clocks and counters at one moment of a run."""

    wall: float
    cpu: float
    sim_cpu: float
    transactions: int
    timeouts: int
    cycles: int
    points: int

    @classmethod
    def take(cls, bus: ModbusBus, sim: SimProcess, rec: Recorder) -> Snapshot:
        """Read every clock and counter now."""
        return cls(
            wall=time.perf_counter(),
            cpu=time.process_time(),
            sim_cpu=sim.cpu_seconds(),
            transactions=bus.stats.transactions,
            timeouts=bus.stats.timeouts,
            cycles=sum(d.stats.cycles for d in bus.devices.values()),
            points=rec.points,
        )


@dataclass
class Window(Snapshot):
    """What happened between two snapshots (`wall` is the window's length in seconds)."""

    @property
    def seconds(self) -> float:
        """Length of the window."""
        return self.wall

    @classmethod
    def between(cls, a: Snapshot, b: Snapshot) -> Window:
        """The differences of b over a."""
        return cls(**{f.name: getattr(b, f.name) - getattr(a, f.name) for f in dataclasses.fields(Snapshot)})


async def flat_out(bench: BenchBus, seconds: float) -> Window:
    """Poll a bus as fast as it goes and measure a steady window of `seconds` after every device answered."""
    async with SimProcess(bench) as sim:
        return await bus_window(bench, sim, seconds)


async def bus_window(bench: BenchBus, sim: SimProcess, seconds: float) -> Window:
    """The gateway's ModbusBus polling `sim`'s devices as configured: a steady window after every device answered."""
    rec = Recorder(bench.cfg)
    bus = ModbusBus(bench.cfg, rec.on_sample, rec.on_state)
    await bus.start()
    try:
        try:
            await asyncio.wait_for(rec.online.wait(), READY_TIMEOUT)
        except TimeoutError:
            late = f"bus {bench.cfg.name}: not every device answered within {READY_TIMEOUT:.0f} s"
            raise RuntimeError(late) from None
        await asyncio.sleep(WARMUP)
        first = Snapshot.take(bus, sim, rec)
        await asyncio.sleep(seconds)
        last = Snapshot.take(bus, sim, rec)
    finally:
        await stop_bus(bus)
    return Window.between(first, last)


#: The columns of a points figure (CPU per 1,000 points polled), for `points_cells`; a bench adds its own after.
POINTS_COLUMNS = (
    "devices",
    "points/device",
    "reads/cycle",
    "window s",
    "cycles",
    "timeouts",
    "points/s",
    "CPU ms/cycle",
    "CPU s per 1000 points",
)


def points_cells(bench: BenchBus, points: int, reads: int, w: Window) -> list[object]:
    """One row of POINTS_COLUMNS: a window of `bench`'s devices of `points` points each, `reads` reads a cycle."""
    return [
        len(bench.cfg.devices),
        points,
        reads,
        f"{w.seconds:.1f}",
        w.cycles,
        w.timeouts,
        round(w.points / w.seconds),
        1000 * w.cpu / max(w.cycles, 1),
        1000 * w.cpu / max(w.points, 1),
    ]
