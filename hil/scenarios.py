"""HIL fault scenarios: a real ModbusBus polls pymodbus slaves that hold known values, through faults.

One rig and one set of scenarios serve both `tests/hil/test_scenarios.py` and `hil/run.py`:

- **Virtual** (the default): the bus opens one end of a baud-accurate `Rs485Line` (a pty behind a
  symlink, as it would open /dev/ttyUSB0), the slaves listen on the other, and the line injects the
  faults on its simulated wire.
- **Real hardware** (`Hardware(gateway_port, device_port)`): the bus opens the gateway's USB–RS-485
  adapter with the configured format; the slaves listen on a pty behind a fault relay (an unpaced
  `Rs485Line` whose gateway side is the device's adapter, opened here). The wire between the two
  adapters is real, so the faults are injected at the device end, on what the device hears and says.

Every register a slave holds is a constant (`known_value`), so a wrong value is recognisable wherever
it appears. A scenario returns a `Result`: its counts and the list of checks that failed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import serial
import yaml

from drivers.modbus.bus import OPEN_TIMEOUT, REOPEN_BACKOFF_MAX, ModbusBus
from drivers.modbus.transport import ModbusLink
from drivers.sim.modbus import ModbusSimulator, SimPoint, SimSlave
from drivers.sim.waves import Wave
from gateway.config.schema import BusConfig
from gateway.config.settings import modbus_line as line_settings
from gateway.types import DeviceState, Sample
from hil.bench.benchlib.configs import config, dump, holding_registers, modbus_device, modbus_line, parse_bus
from hil.line import Faults, FrameFormat, Rs485Line

#: What `--scenario all` runs, in this order.
SCENARIOS = ("noise", "late", "unplug", "mixed")
#: Seconds each scenario's faults last unless told otherwise (the short test runs).
DEFAULT_SECONDS = {"noise": 5.0, "late": 5.0, "late-same-unit": 3.0, "mixed": 3.0}
#: The seed each scenario uses unless told otherwise (the figures in hil/README.md come from these).
DEFAULT_SEEDS = {"noise": 11, "mixed": 11, "late": 5, "unplug": 1}
#: How long the line stays unplugged in the virtual unplug scenario.
UNPLUG_SECONDS = 2.0


@dataclass
class Recorder:
    """Collects what a bus reports."""

    samples: list[Sample] = field(default_factory=list)
    states: list[DeviceState] = field(default_factory=list)

    def sample(self, s: Sample) -> None:
        """The bus's `on_sample`."""
        self.samples.append(s)

    def state(self, s: DeviceState) -> None:
        """The bus's `on_state`."""
        self.states.append(s)


def known_value(unit: int, address: int) -> int:
    """The constant a simulated holding register holds: distinct per unit and address."""
    return (unit * 1000 + address) & 0xFFFF


def registers(unit: int, count: int, *, poll: str = "20ms", first: int = 0) -> dict[str, Any]:
    """Device d<unit> with `count` uint16 holding registers from `first` (values: see known_value)."""
    return modbus_device(f"d{unit}", unit, holding_registers(count, first), poll=poll)


def bus_config(devices: str | Sequence[Mapping[str, Any]], **bus: object) -> BusConfig:
    """A bus config validated exactly like a user's: its devices as dicts (see `registers`) or as YAML text."""
    listed: Sequence[Mapping[str, Any]] = yaml.safe_load(devices) if isinstance(devices, str) else devices
    settings = {"port": "/dev/null", "baudrate": 19200, "parity": "E", **bus}
    line = modbus_line("line", str(settings.pop("port")), listed, **settings)
    return parse_bus(dump(config(modbus=[line])))


@dataclass(frozen=True, slots=True)
class Hardware:
    """Two real USB–RS-485 adapters wired A–A, B–B: the gateway's and the device's."""

    gateway_port: str
    device_port: str


@dataclass
class Rig:
    """A bus, the line (or the fault relay in front of the real wire) and the slaves behind it."""

    bus: ModbusBus
    sim: ModbusSimulator
    rec: Recorder
    line: Rs485Line
    hardware: Hardware | None = None
    device_serial: serial.Serial | None = None  # the device's adapter, held open for the relay
    stopped: bool = False

    @property
    def gateway_port(self) -> str:
        """The port the bus opens."""
        return str(self.bus.cfg.port)

    def wrong_values(self) -> list[tuple[str, str, object, int]]:
        """Every published value that differs from what its slave held: (device, point, got, held)."""
        units = {d.name: d.unit for d in self.bus.cfg.devices}
        addresses = {(d.name, p.name): p.address for d in self.bus.cfg.devices for p in d.points}
        wrong: list[tuple[str, str, object, int]] = []
        for s in self.rec.samples:
            for name, value in s.values.items():
                held = known_value(units[s.device], addresses[(s.device, name)])
                if value != held:
                    wrong.append((s.device, name, value, held))
        return wrong

    def values_published(self) -> int:
        """Values handed to `on_sample` so far."""
        return sum(len(s.values) for s in self.rec.samples)

    def all_online(self) -> bool:
        """Whether every device is online."""
        return all(d.online for d in self.bus.devices.values())

    def all_offline(self) -> bool:
        """Whether every device has been declared offline."""
        return all(d.online is False for d in self.bus.devices.values())

    def online_map(self) -> dict[str, bool | None]:
        """Each device's online flag, for a failure message."""
        return {name: d.online for name, d in self.bus.devices.items()}

    async def wait_for(self, cond: Callable[[], bool], timeout: float) -> bool:
        """Poll `cond` until it holds or `timeout` seconds passed."""
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def back_online(self) -> bool:
        """Whether every device is online again by its next probe (offline ones back off: 1, 2, 4 ... s)."""
        limit = max(d.backoff for d in self.bus.devices.values()) + 3.0
        return await self.wait_for(self.all_online, limit)

    async def stop(self) -> None:
        """Stop the bus, the slaves and the line; close the device's adapter. Safe to call twice."""
        if self.stopped:
            return
        self.stopped = True
        await self.bus.stop()
        await self.sim.stop()
        await self.line.stop()
        if self.device_serial is not None:
            self.device_serial.close()


class Rigs:
    """Builds rigs, virtual or on real adapters, and stops whatever is still running at the end.

    `baudrate` and `frame_format`, when given, override what a scenario would choose (the command
    line's `--baud` and `--format`); on real adapters they are what both adapters are set to.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        hardware: Hardware | None = None,
        baudrate: int | None = None,
        frame_format: str | None = None,
        frame_gap: float | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.hardware = hardware
        self.baudrate = baudrate
        self.format = FrameFormat.parse(frame_format) if frame_format else None
        self.frame_gap = frame_gap
        self._rigs: list[Rig] = []

    @property
    def real(self) -> bool:
        """Whether the rigs run on real adapters."""
        return self.hardware is not None

    async def build(
        self,
        devices: str | Sequence[Mapping[str, Any]],
        *,
        faults: Faults | None = None,
        seed: int = 1,
        start: bool = True,
        **settings: object,
    ) -> Rig:
        """Line (or relay) + slaves with known values + a bus, from its devices (dicts or YAML) and bus settings."""
        if self.baudrate is not None:
            settings["baudrate"] = self.baudrate
        if self.format is not None:
            settings.update(bytesize=self.format.bytesize, parity=self.format.parity, stopbits=self.format.stopbits)
        cfg = line_settings(bus_config(devices, **settings))
        frame_format = FrameFormat(cfg.bytesize, cfg.parity, cfg.stopbits)
        slaves = [
            SimSlave(
                d.unit,
                [
                    SimPoint(p.name, p.table, p.address, p.codec, Wave(value=known_value(d.unit, p.address)))
                    for p in d.points
                ],
            )
            for d in cfg.devices
        ]
        rec = Recorder()
        device_serial: serial.Serial | None = None
        if self.hardware is None:
            line = Rs485Line(
                self.workdir / f"ttyHIL{len(self._rigs)}",
                baudrate=cfg.baudrate,
                frame_format=frame_format,
                faults=faults,
                seed=seed,
            )
            await line.start()
            # The bus times its gaps and timeouts from the configured format (8E1); the pty only takes 8N1.
            link = ModbusLink(
                line.gateway_port,
                baudrate=cfg.baudrate,
                parity="N",
                bytesize=cfg.bytesize,
                stopbits=cfg.stopbits,
                connect_timeout=OPEN_TIMEOUT,
            )
            bus = ModbusBus(replace(cfg, port=line.gateway_port), rec.sample, rec.state, link=link)
        else:
            # The device's adapter is opened as the wire needs it; the relay carries its bytes to and from
            # a pty where the slaves listen, faults applied, no timing added.
            device_serial = serial.Serial(
                self.hardware.device_port,
                baudrate=cfg.baudrate,
                bytesize=cfg.bytesize,
                parity=cfg.parity,
                stopbits=cfg.stopbits,
                timeout=0,
            )
            device_serial.reset_input_buffer()
            line = Rs485Line(
                baudrate=cfg.baudrate,
                frame_format=frame_format,
                faults=faults,
                seed=seed,
                pace=False,
                gateway_fd=device_serial.fileno(),
                frame_gap=self.frame_gap,
            )
            await line.start()
            # The gateway's adapter takes the real format, parity included.
            bus = ModbusBus(replace(cfg, port=self.hardware.gateway_port), rec.sample, rec.state)
        sim = ModbusSimulator(line.device_port, slaves, baudrate=cfg.baudrate)
        rig = Rig(bus, sim, rec, line, self.hardware, device_serial)
        self._rigs.append(rig)
        try:
            await sim.start()
            if start:
                await bus.start()
        except BaseException:
            await rig.stop()
            raise
        return rig

    async def close(self) -> None:
        """Stop every rig still running."""
        for rig in self._rigs:
            await rig.stop()
        self._rigs.clear()

    async def __aenter__(self) -> Rigs:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


# --- results ----------------------------------------------------------------------------------------


@dataclass
class Result:
    """What one scenario saw: its counts and every check that failed (none: it passed)."""

    name: str
    counts: dict[str, int | float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the scenario did not run
    seconds: float = 0.0
    summary: str = ""  # one human line of what happened

    @property
    def passed(self) -> bool:
        """Whether every check held (a skipped scenario has no failed check)."""
        return not self.failures

    def check(self, ok: bool, failure: str) -> None:
        """Record `failure` unless `ok`."""
        if not ok:
            self.failures.append(failure)

    def check_values(self, rig: Rig) -> None:
        """No value handed to `on_sample` may differ from what its slave held."""
        wrong = rig.wrong_values()
        if wrong:
            examples = ", ".join(f"{d}.{p} = {got} (slave held {held})" for d, p, got, held in wrong[:3])
            self.failures.append(f"{len(wrong)} wrong values published, e.g. {examples}")


#: Line counters shown as "faults injected", in this order.
_INJECTED = (
    ("flipped_bytes", "flips"),
    ("dropped_bytes", "drops"),
    ("truncated_frames", "truncated"),
    ("babble_bursts", "babble"),
    ("late_replies", "late"),
    ("late_cross_unit", "late in another unit's turn"),
    ("unplugs", "unplugs"),
)


def _counts(rig: Rig) -> dict[str, int | float]:
    bus, line = rig.bus.stats, rig.line.stats
    counts: dict[str, int | float] = {
        "transactions": bus.transactions,
        "values": rig.values_published(),
        "wrong_values": len(rig.wrong_values()),
        "crc_errors": bus.crc_errors,
        "timeouts": bus.timeouts,
        "errors": bus.errors,
        "reopen_attempts": bus.reopen_attempts,
    }
    counts.update({key: getattr(line, key) for key, _ in _INJECTED})
    return counts


def injected(counts: dict[str, int | float]) -> str:
    """The faults a scenario's counts say were injected, in words."""
    return ", ".join(f"{counts[key]} {word}" for key, word in _INJECTED if counts.get(key)) or "none"


def _finish(result: Result, rig: Rig, started: float) -> Result:
    result.counts.update(_counts(rig))
    if rig.line.port_error:
        result.failures.append(f"the device's adapter stopped carrying bytes: {rig.line.port_error}")
    result.seconds = time.monotonic() - started
    return result


# --- scenarios --------------------------------------------------------------------------------------


async def _noisy(rigs: Rigs, name: str, faults: Faults, seconds: float, seed: int) -> tuple[Result, Rig]:
    """Three devices polled through `faults` for `seconds`, then on a clean line until all are back."""
    started = time.monotonic()
    result = Result(name)
    devices = [registers(u, 10) for u in (1, 2, 3)]
    # 115200 baud carries ~6x the bytes of 19200 per second: more faults in a short run.
    rig = await rigs.build(devices, faults=faults, seed=seed, baudrate=115200)
    try:
        await asyncio.sleep(seconds)
        rig.line.faults = Faults()  # the noise stops
        noisy = rig.bus.stats.transactions
        online = await rig.back_online()
        # Every device answers again after the noise: polled cycles, not only a state flag.
        cycles = {n: d.stats.cycles for n, d in rig.bus.devices.items()}
        await asyncio.sleep(0.5)
        stuck = [n for n, d in rig.bus.devices.items() if d.stats.cycles <= cycles[n]]
        result.check_values(rig)
        result.check(rig.bus.stats.crc_errors > 0, "no CRC error counted: the noise never reached the gateway")
        result.check(online, f"not every device came back online after the noise: {rig.online_map()}")
        result.check(not stuck, f"not polled again after the noise: {', '.join(stuck)}")
        result.counts["noisy_transactions"] = noisy
        _finish(result, rig, started)
        stats = rig.bus.stats
        result.summary = (
            f"{name} {seconds:g} s: {noisy} transactions, injected {injected(result.counts)}; "
            f"bus: {stats.crc_errors} CRC errors, {stats.timeouts} timeouts, {stats.errors} other errors"
        )
    finally:
        await rig.stop()
    return result, rig


async def line_noise(rigs: Rigs, *, seconds: float | None = None, seed: int | None = None) -> Result:
    """Bit flips at 1e-3 per byte: no wrong value, CRC errors counted, no device left offline."""
    seconds = DEFAULT_SECONDS["noise"] if seconds is None else seconds
    seed = DEFAULT_SEEDS["noise"] if seed is None else seed
    result, rig = await _noisy(rigs, "noise", Faults(flip_rate=1e-3), seconds, seed)
    result.check(rig.line.stats.flipped_bytes > 0, "no byte was flipped: run longer")
    return result


async def mixed_noise(rigs: Rigs, *, seconds: float | None = None, seed: int | None = None) -> Result:
    """Flips and drops (1e-3/byte), 1 % truncated frames, 2 babble bursts/s together: as `line_noise`."""
    seconds = DEFAULT_SECONDS["mixed"] if seconds is None else seconds
    seed = DEFAULT_SEEDS["mixed"] if seed is None else seed
    faults = Faults(flip_rate=1e-3, drop_rate=1e-3, truncate_rate=0.01, babble_rate=2.0, babble_max=8)
    result, rig = await _noisy(rigs, "mixed", faults, seconds, seed)
    line = rig.line.stats
    missing = [
        word
        for word, n in (
            ("flipped", line.flipped_bytes),
            ("dropped", line.dropped_bytes),
            ("truncated", line.truncated_frames),
            ("babble", line.babble_bursts),
        )
        if not n
    ]
    result.check(not missing, f"not every fault happened ({', '.join(missing)}: none): run longer")
    return result


async def late_other_unit(
    rigs: Rigs, *, seconds: float | None = None, retries: int = 0, seed: int | None = None
) -> Result:
    """Unit 1 answers late now and then: its late replies are never published as unit 2's values."""
    seconds = DEFAULT_SECONDS["late"] if seconds is None else seconds
    seed = DEFAULT_SEEDS["late"] if seed is None else seed
    started = time.monotonic()
    result = Result(f"late, retries {retries}")
    devices = [registers(u, 1, poll="0.1ms") for u in (1, 2)]
    rig = await rigs.build(devices, seed=seed, retries=retries, start=False)
    try:
        # Late: past the bus's response timeout (~111 ms for one register at 19200 8E1), spread over
        # the next ~3.6 timeouts — beyond the one timeout the bus lets the line settle after a failure,
        # so some late replies still arrive while the gateway waits for unit 2 (the unit-id check must
        # refuse them). With a retry, the retry's own reply, queued behind a late one, can land in
        # unit 2's turn too.
        timeout = rig.bus.devices["d1"].timeout("holding", 1)
        rig.line.faults = Faults(
            late_rate=0.5, late_delay=timeout, late_spread=3.6 * timeout, late_units=frozenset({1})
        )
        await rig.bus.start()
        await asyncio.sleep(seconds)
        rig.line.faults = Faults()
        online = await rig.back_online()
        line = rig.line.stats
        result.check(line.late_replies > 5, f"only {line.late_replies} late replies: run longer")
        result.check_values(rig)
        if retries == 0:
            result.check(
                line.late_cross_unit > 0, "no late reply arrived while the gateway waited for unit 2: run longer"
            )
        result.check(online, f"not every device came back online: {rig.online_map()}")
        _finish(result, rig, started)
        stats = rig.bus.stats
        result.summary = (
            f"late replies {seconds:g} s, retries {retries}: {line.late_replies} late of {line.frames_to_gateway} "
            f"frames, {line.late_cross_unit} after a request to unit 2; bus: {stats.transactions} transactions, "
            f"{stats.timeouts} timeouts, {stats.crc_errors} CRC errors, {stats.errors} other errors, "
            f"{rig.values_published()} values published"
        )
    finally:
        await rig.stop()
    return result


async def late_same_unit(rigs: Rigs, *, seconds: float | None = None, seed: int | None = None) -> Result:
    """A late reply is never published as another block of the same device."""
    # One device, two one-register blocks far apart (two reads per cycle), one retry. When unit 1
    # answers late, the retry's request is answered twice: first by the late reply, then by the
    # retry's own. The second arrives while the gateway waits for the next block: same unit, same
    # function, same length — only the gateway's timing can tell them apart.
    seconds = DEFAULT_SECONDS["late-same-unit"] if seconds is None else seconds
    seed = DEFAULT_SEEDS["late"] if seed is None else seed
    started = time.monotonic()
    result = Result("late, same unit")
    devices = [modbus_device("d1", 1, [*holding_registers(1), *holding_registers(1, first=100)], poll="0.1ms")]
    rig = await rigs.build(devices, seed=seed, retries=1, start=False)
    try:
        timeout = rig.bus.devices["d1"].timeout("holding", 1)
        rig.line.faults = Faults(late_rate=0.2, late_delay=timeout, late_spread=0.27 * timeout)
        await rig.bus.start()
        await asyncio.sleep(seconds)
        line = rig.line.stats
        result.check(line.late_replies > 3, f"only {line.late_replies} late replies: run longer")
        result.check_values(rig)
        _finish(result, rig, started)
        stats = rig.bus.stats
        result.summary = (
            f"same device {seconds:g} s: {line.late_replies} late replies; {stats.transactions} transactions, "
            f"{stats.timeouts} timeouts; wrong values: {len(rig.wrong_values())} of {rig.values_published()}"
        )
    finally:
        await rig.stop()
    return result


async def unplug(
    rigs: Rigs,
    *,
    seed: int | None = None,
    operator: Callable[[str], None] | None = None,
    operator_timeout: float = 60.0,
) -> Result:
    """The gateway's adapter out and back: every device offline at once, then online by itself.

    Virtual: the line pulls the adapter for UNPLUG_SECONDS. Real: `operator` is told to pull and
    replug it (each step waits up to `operator_timeout` s); without an operator the scenario is skipped.
    """
    seed = DEFAULT_SEEDS["unplug"] if seed is None else seed
    if rigs.real and operator is None:
        return Result("unplug", skipped="needs an operator to pull and replug the adapter (stdin is not a terminal)")
    started = time.monotonic()
    result = Result("unplug")
    devices = [registers(u, 2, poll="50ms") for u in (1, 2)]
    rig = await rigs.build(devices, seed=seed)
    try:
        if not await rig.wait_for(rig.all_online, 5):
            result.failures.append(f"not every device online before the unplug: {rig.online_map()}")
            return _finish(result, rig, started)
        unplugged = time.monotonic()
        if operator is None:
            rig.line.unplug(UNPLUG_SECONDS)
            went = await rig.wait_for(rig.all_offline, UNPLUG_SECONDS)
        else:
            operator(f"Pull the gateway's adapter ({rig.gateway_port}) out now; waiting up to {operator_timeout:g} s.")
            went = await rig.wait_for(rig.all_offline, operator_timeout)
        offline_after = time.monotonic() - unplugged
        result.counts["offline_after_s"] = round(offline_after, 2)
        if not went:
            result.failures.append(f"not every device went offline: {rig.online_map()}")
            return _finish(result, rig, started)
        if operator is None:
            await asyncio.sleep(max(0.0, UNPLUG_SECONDS - (time.monotonic() - unplugged)))
            limit = 10.0
        else:
            operator(f"All offline after {offline_after:.1f} s. Plug it back in; waiting up to {operator_timeout:g} s.")
            # The bus reopens the port with back-off (at most REOPEN_BACKOFF_MAX between tries).
            limit = operator_timeout + REOPEN_BACKOFF_MAX + 5.0
        samples = len(rig.rec.samples)
        # The bus reopens with back-off (1, 2, 4 ... s) and probes offline devices: it must find the
        # port behind the same path without help.
        back = await rig.wait_for(rig.all_online, limit)
        back_after = time.monotonic() - unplugged
        result.counts["back_after_s"] = round(back_after, 2)
        result.check(back, f"not every device came back online by itself: {rig.online_map()}")
        for name in rig.bus.devices:
            states = [s.online for s in rig.rec.states if s.device == name]
            result.check(states == [True, False, True], f"{name} went online/offline as {states}, not once each way")
        await asyncio.sleep(0.3)
        result.check(len(rig.rec.samples) > samples, "not polling again after the replug")
        result.check_values(rig)
        _finish(result, rig, started)
        result.summary = (
            f"unplugged: offline after {offline_after:.2f} s, all online again {back_after:.2f} s after the unplug "
            f"({rig.bus.stats.reopen_attempts} reopen attempts)"
        )
    finally:
        await rig.stop()
    return result


async def run(
    name: str,
    rigs: Rigs,
    *,
    seconds: float | None = None,
    seed: int | None = None,
    operator: Callable[[str], None] | None = None,
    operator_timeout: float = 60.0,
) -> list[Result]:
    """Run one scenario by its command-line name; `late` runs its three variants."""
    if name == "noise":
        return [await line_noise(rigs, seconds=seconds, seed=seed)]
    if name == "mixed":
        return [await mixed_noise(rigs, seconds=seconds, seed=seed)]
    if name == "late":
        return [
            await late_other_unit(rigs, seconds=seconds, retries=0, seed=seed),
            await late_other_unit(rigs, seconds=seconds, retries=1, seed=seed),
            await late_same_unit(rigs, seconds=seconds, seed=seed),
        ]
    if name == "unplug":
        return [await unplug(rigs, seed=seed, operator=operator, operator_timeout=operator_timeout)]
    raise ValueError(f"unknown scenario {name!r}: one of {', '.join(SCENARIOS)}")


def parse_scenarios(text: str) -> list[str]:
    """`noise,late` or `all` as a list of scenario names, in the order given."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        named = ", ".join(unknown) if unknown else repr(text)
        raise ValueError(f"unknown scenario {named}: choose from {', '.join(SCENARIOS)} or all")
    return list(dict.fromkeys(names))


def failed(results: Sequence[Result]) -> list[Result]:
    """The results with a failed check."""
    return [r for r in results if not r.passed]
