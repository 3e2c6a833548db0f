"""The line scheduler against pymodbus slaves on a virtual serial line (real pty, real RTU frames)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

import drivers.modbus.schedule
import drivers.modbus.timing
from drivers.modbus.bus import ModbusBus
from drivers.modbus.device import PROBE_BACKOFF_MAX, PROBE_LINE_SHARE, Device
from drivers.modbus.settings import LineSettings
from drivers.modbus.transport import ModbusLink
from drivers.sim.line import VirtualLine
from drivers.sim.modbus import ModbusSimulator, SimPoint, SimSlave
from gateway.config.addresses import modbus_port
from gateway.config.settings import modbus_line
from gateway.errors import BusUnavailable, DeviceException, DeviceTimeout
from gateway.types import Write
from hil import scenarios

from configs import Section, device, point
from helpers import Recorder


def bus_config(devices: str | list[Section], **bus: object) -> LineSettings:
    """A bus config validated exactly like a user's (devices as YAML text or the builder's dicts): 115200 baud, no
    parity (ptys refuse even parity)."""
    return modbus_line(scenarios.bus_config(devices, **{"baudrate": 115200, "parity": "N", **bus}))


@dataclass
class Rig:
    """A bus wired to simulated slaves."""

    bus: ModbusBus
    sim: ModbusSimulator
    rec: Recorder
    line: VirtualLine


@pytest.fixture
def make_rig(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Build a line + simulator + bus from a bus config; everything is stopped at the end."""
    rigs: list[Rig] = []

    async def build(cfg: LineSettings, dead: tuple[int, ...] = ()) -> Rig:
        line = VirtualLine(tmp_path / f"tty{len(rigs)}")
        line.start()
        slaves = [
            SimSlave(d.unit, [SimPoint(p.name, p.table, p.address, p.codec) for p in d.points], dead=d.unit in dead)
            for d in cfg.devices
        ]
        sim = ModbusSimulator(line.device_port, slaves)
        await sim.start()
        rec = Recorder()
        bus = ModbusBus(replace(cfg, port=line.gateway_port), rec.sample, rec.state)
        rig = Rig(bus, sim, rec, line)
        rigs.append(rig)
        return rig

    yield build
    for rig in rigs:
        # Stopped in the fixture's own loop by the async finaliser below.
        rig.line.close()


@pytest.fixture
async def cleanup() -> AsyncIterator[list[Rig]]:
    """Rigs registered here are stopped (bus, then simulator) after the test."""
    rigs: list[Rig] = []
    yield rigs
    for rig in rigs:
        await rig.bus.stop()
        await rig.sim.stop()


async def start(make_rig, cleanup, cfg: LineSettings, dead: tuple[int, ...] = ()) -> Rig:  # type: ignore[no-untyped-def]
    rig = await make_rig(cfg, dead)
    cleanup.append(rig)
    await rig.bus.start()
    return rig


async def test_writes_jump_ahead_of_polling(make_rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    points = [point("sp", "holding", 500, writable=True)] + [point(f"p{i}", "holding", i * 20) for i in range(10)]
    cfg = bus_config([device("d", 1, poll="10ms", max_gap=0, points=points)], inter_request_delay="20ms")
    rig = await start(make_rig, cleanup, cfg)
    await asyncio.sleep(0.3)
    before = rig.bus.stats.transactions
    result = await rig.bus.write(Write("d", "sp", 42))
    assert result.ok and result.value == 42
    assert rig.sim.get(1, "sp") == 42
    # A full cycle is 11 reads; the write waited for at most the read in progress,
    # then took its own transaction and the read-back.
    assert rig.bus.stats.transactions - before <= 3


async def test_dead_unit_goes_offline_and_is_probed_with_back_off(make_rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    cfg = bus_config(
        """        - name: live
          unit: 1
          poll: 50ms
          points: [{name: v, table: holding, address: 0}]
        - name: dead
          unit: 2
          poll: 50ms
          points: [{name: v, table: holding, address: 0}]""",
        retries=1,
    )
    rig = await start(make_rig, cleanup, cfg, dead=(2,))
    dead, live = rig.bus.devices["dead"], rig.bus.devices["live"]
    deadline = time.monotonic() + 5
    while dead.online is not False and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    states = [s for s in rig.rec.states if s.device == "dead"]
    assert [s.online for s in states] == [False]
    assert "no response" in states[0].reason
    # First failed poll with its retry (2 tries), then one try per poll until offline.
    assert dead.stats.transactions == 4, dead.stats.transactions
    # Offline: the dead unit is only probed from now on, the first time after one timeout / PROBE_LINE_SHARE
    # (test_schedule.py checks the back-off and that the neighbour keeps its poll rate).
    assert dead.backoff == pytest.approx(dead.timeout("holding", 1) / PROBE_LINE_SHARE)
    assert live.online is True


class UnitLink(ModbusLink):
    """A real link that notes each read, answered or not: (unit, handed to pymodbus at, ended at)."""

    def __init__(self, port: str) -> None:
        super().__init__(port, baudrate=115200, parity="N")
        self.reads: list[tuple[int, float, float]] = []

    async def read(self, table: str, unit: int, address: int, count: int, timeout: float) -> list[int] | list[bool]:
        """The read, noted when it ends."""
        sent = time.monotonic()
        try:
            return await super().read(table, unit, address, count, timeout)
        finally:
            self.reads.append((unit, sent, time.monotonic()))


async def test_after_a_timeout_the_unit_waits_one_more_timeout_while_the_others_use_the_line(  # type: ignore[no-untyped-def]
    make_rig, cleanup
) -> None:
    # A unit that never answers but is never declared offline fails every poll: after each timeout its next
    # request waits one more timeout (its late answer must not meet a different request). The order of the
    # reads on the line shows it, however busy the machine (test_schedule.py checks the rates).
    cfg = bus_config(
        """        - name: live
          unit: 1
          poll: 10ms
          points: [{name: v, table: holding, address: 0}]
        - name: silent
          unit: 2
          poll: 10ms
          offline_after: 100
          points: [{name: v, table: holding, address: 0}]""",
        retries=0,
        timeout="100ms",
    )
    rig = await make_rig(cfg, dead=(2,))
    cleanup.append(rig)
    link = UnitLink(rig.bus.cfg.port)
    rig.bus = ModbusBus(rig.bus.cfg, rig.rec.sample, rig.rec.state, link=link)
    await rig.bus.start()
    deadline = time.monotonic() + 30
    while sum(unit == 2 for unit, _, _ in link.reads) < 6:
        assert time.monotonic() < deadline, link.reads
        await asyncio.sleep(0.05)
    silent = [(i, sent, ended) for i, (unit, sent, ended) in enumerate(link.reads) if unit == 2]
    settling = []  # per failed read of the silent unit: did a neighbour's read start before its settle was over
    for (i, _, ended), (j, sent, _) in zip(silent, silent[1:], strict=False):
        assert sent >= ended + 0.1, (ended, sent)  # never sooner than one timeout after the last one failed
        between = [started for unit, started, _ in link.reads[i + 1 : j] if unit == 1]
        assert between  # the neighbour was polled meanwhile
        settling.append(min(between) < ended + 0.1)
    # The wait is the silent unit's alone, not the line's: a neighbour's read started inside it (in every
    # window on an idle machine; a busy one may stall the odd window past its 100 ms, not all five).
    assert any(settling), link.reads
    assert rig.bus.devices["silent"].online is not False


class TimedLink(ModbusLink):
    """A real link that notes when each read was handed to pymodbus and when its answer's last byte came."""

    def __init__(self, port: str) -> None:
        super().__init__(port, baudrate=115200, parity="N")
        self.reads: list[tuple[float, float]] = []

    async def read(self, table: str, unit: int, address: int, count: int, timeout: float) -> list[int] | list[bool]:
        """The read, timed."""
        sent = time.monotonic()
        data = await super().read(table, unit, address, count, timeout)
        self.reads.append((sent, self.last_rx))
        return data


async def test_the_silence_between_frames_is_kept_to_the_fraction_of_a_millisecond(  # type: ignore[no-untyped-def]
    make_rig, cleanup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fast line's t3.5 is 1.75 ms. Slept on asyncio's epoll loop it becomes 2-3 ms (the wait is rounded
    # up to whole milliseconds): at 115200 baud a tenth of the line. It must never be shorter either,
    # counted from the last byte heard to the next request.
    points = [point(f"p{i}", "holding", i * 20) for i in range(3)]
    devices = [device(f"d{u}", u, poll="0.1ms", max_gap=0, points=points) for u in (1, 2)]
    cfg = bus_config(devices, inter_request_delay="1.5ms")
    rig = await make_rig(cfg)
    cleanup.append(rig)
    link = TimedLink(rig.bus.cfg.port)
    precise: list[float] = []
    sleep_until = drivers.modbus.timing._sleep_until

    def timed_wait(end: float) -> None:
        precise.append(end)
        sleep_until(end)

    monkeypatch.setattr(drivers.modbus.timing, "_sleep_until", timed_wait)
    rig.bus = ModbusBus(rig.bus.cfg, rig.rec.sample, rig.rec.state, link=link)
    await rig.bus.start()
    # As many gaps as it takes, not as many as 1.5 s allow (a busy machine gets fewer).
    deadline = time.monotonic() + 60
    while len(link.reads) < 50 + 201:
        assert time.monotonic() < deadline, len(link.reads)
        await asyncio.sleep(0.05)
    reads = link.reads[50:]
    gaps = sorted(b[0] - a[1] for a, b in zip(reads, reads[1:], strict=False))
    assert gaps[0] >= 0.0015  # never early, however busy the machine
    median = gaps[len(gaps) // 2]
    print(f"gap 1.5 ms: {len(gaps)} gaps, shortest {gaps[0] * 1000:.3f} ms, median {median * 1000:.3f} ms")
    # Precise, not rounded up to whole milliseconds by asyncio's epoll wait (a median >= 2.05 ms): the silences
    # are waited by the precise timer, which times to tens of microseconds on an idle machine (~1.6 ms median).
    # How precise it is on a given machine is a speed figure: hil/bench/modbus_bench.py (figure 2, saturated
    # line paced by the t3.5 gap) measures it; a busy machine delays any wait, so no wall bound here.
    # (A silence already over when the next request is ready, as under load, needs no wait at all.)
    assert precise, "the silences were not waited by the precise timer"


async def test_exception_for_one_block_keeps_the_device_online(make_rig, cleanup) -> None:  # type: ignore[no-untyped-def]
    cfg = bus_config("""        - name: d
          unit: 1
          poll: 100ms
          points:
            - {name: good, table: holding, address: 0}
            - {name: far, table: holding, address: 60000}""")
    rig = await make_rig(cfg)
    cleanup.append(rig)
    # The simulator knows only its points' area; shrink it so address 60000 is illegal.
    rig.sim.slaves[1].points = [p for p in rig.sim.slaves[1].points if p.name == "good"]
    await rig.sim.stop()
    rig.sim = ModbusSimulator(rig.line.device_port, [rig.sim.slaves[1]])
    await rig.sim.start()
    cleanup[-1] = rig
    rig.sim.set(1, "good", 7)
    await rig.bus.start()
    await asyncio.sleep(0.5)
    device = rig.bus.devices["d"]
    assert device.online is True
    assert device.stats.exceptions >= 3
    assert all(s.values == {"good": 7} for s in rig.rec.samples)


async def test_line_that_cannot_open_marks_devices_offline_then_recovers(tmp_path: Path) -> None:
    link = tmp_path / "later"
    cfg = replace(
        bus_config("""        - name: d
          unit: 1
          poll: 100ms
          points: [{name: v, table: holding, address: 0, writable: true}]"""),
        port=str(link),
    )
    rec = Recorder()
    bus = ModbusBus(cfg, rec.sample, rec.state)
    await bus.start()
    line = None
    sim = None
    try:
        await asyncio.sleep(0.3)
        assert [s.online for s in rec.states] == [False]
        assert "cannot open" in rec.states[0].reason
        result = await bus.write(Write("d", "v", 1))
        assert result.ok is False and "is down" in (result.error or "")
        line = VirtualLine(link)
        line.start()
        sim = ModbusSimulator(
            line.device_port, [SimSlave(1, [SimPoint("v", "holding", 0, cfg.devices[0].points[0].codec)])]
        )
        await sim.start()
        deadline = time.monotonic() + 6
        while not (rec.states and rec.states[-1].online) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert rec.states[-1].online is True
    finally:
        await bus.stop()
        if sim:
            await sim.stop()
        if line:
            line.close()


async def test_devices_are_probed_at_once_when_a_lost_port_opens_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each failed reopen backs the devices' probes off further; the port's return must not wait for that."""
    monkeypatch.setattr(drivers.modbus.schedule, "REOPEN_BACKOFF_MAX", 1.0)  # a reopen attempt every second
    link = tmp_path / "later"
    cfg = replace(
        bus_config("""        - name: d
          unit: 1
          poll: 100ms
          points: [{name: v, table: holding, address: 0}]"""),
        port=str(link),
    )
    rec = Recorder()
    bus = ModbusBus(cfg, rec.sample, rec.state)
    await bus.start()
    line = sim = None
    try:
        # Four failed opens (about 3.2 s on an idle machine; counted, not timed): the probe back-off is then far
        # beyond the next reopen.
        device = bus.devices["d"]
        deadline = time.monotonic() + 30
        while bus.stats.reopen_attempts < 4:
            assert time.monotonic() < deadline, bus.stats.reopen_attempts
            await asyncio.sleep(0.02)
        assert device.online is False and device.next_probe > time.monotonic() + 5, device.backoff
        line = VirtualLine(link)
        line.start()
        sim = ModbusSimulator(
            line.device_port, [SimSlave(1, [SimPoint("v", "holding", 0, cfg.devices[0].points[0].codec)])]
        )
        await sim.start()
        deadline = time.monotonic() + 10
        while not bus.port_open and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert bus.port_open
        opened = time.monotonic()
        while not device.online and time.monotonic() < opened + 10:
            await asyncio.sleep(0.02)
        assert device.online is True
        # At once (one poll, well under a second on an idle machine), not at the backed-off probe >= 5 s away.
        assert time.monotonic() - opened < 2.5
    finally:
        await bus.stop()
        if sim:
            await sim.stop()
        if line:
            line.close()


async def test_link_maps_pymodbus_failures_to_our_errors(tmp_path: Path) -> None:
    with pytest.raises(BusUnavailable, match="cannot open"):
        await ModbusLink(str(tmp_path / "missing"), parity="N").open()
    line = VirtualLine(tmp_path / "tty")
    line.start()
    sim = ModbusSimulator(line.device_port, [SimSlave(1, []), SimSlave(2, [], dead=True)])
    await sim.start()
    link = ModbusLink(line.gateway_port, baudrate=115200, parity="N")
    try:
        await link.open()
        assert await link.read("holding", 1, 0, 3, 0.5) == [0, 0, 0]
        with pytest.raises(DeviceException) as info:
            await link.read("holding", 1, 60000, 1, 0.5)
        assert info.value.code == 2 and "illegal data address" in str(info.value)
        with pytest.raises(DeviceTimeout) as timeout:
            await link.read("holding", 2, 0, 1, 0.2)
        assert isinstance(timeout.value.__cause__, Exception)  # the pymodbus cause is kept
        with pytest.raises(DeviceTimeout):
            await link.read("holding", 9, 0, 1, 0.2)  # nobody there
        # A port that went away (pymodbus raises "Not connected" at the call itself, not when awaited).
        link.close()
        with pytest.raises(BusUnavailable, match="Not connected"):
            await link.read("holding", 1, 0, 1, 0.2)
        with pytest.raises(BusUnavailable, match="Not connected"):
            await link.write("holding", 1, 0, [7], 0.2)
    finally:
        link.close()
        await sim.stop()
        line.close()


def test_timeouts_follow_the_baud_rate_unless_configured() -> None:
    slow = bus_config(
        """        - name: d
          unit: 1
          points: [{name: v, table: holding, address: 0}]""",
        baudrate=1200,
    )
    fast = replace(slow, baudrate=115200)
    dev_slow, dev_fast = Device(slow.devices[0], slow), Device(fast.devices[0], fast)
    assert dev_slow.timeout("holding", 125) > 2.0
    assert dev_fast.timeout("holding", 125) < 0.15
    assert dev_fast.timeout("holding", 125) > 0.022
    fixed = replace(slow, timeout=0.5)
    assert Device(fixed.devices[0], fixed).timeout("holding", 125) == 0.5


def test_offline_after_n_failures_and_back_off_doubles_to_a_minute() -> None:
    cfg = bus_config(
        """        - name: d
          unit: 1
          offline_after: 2
          points: [{name: v, table: holding, address: 0}]""",
        timeout="20ms",
    )
    dev = Device(cfg.devices[0], cfg)
    assert dev.record_failure(0.0) is False
    assert dev.record_failure(0.0) is True and dev.online is False
    assert dev.next_probe == 1.0
    waits = []
    for _ in range(12):
        dev.record_failure(100.0)
        waits.append(dev.next_probe - 100.0)
    assert waits[:4] == [2.0, 4.0, 8.0, 16.0]
    assert waits[-1] == PROBE_BACKOFF_MAX == 60.0
    assert dev.record_success() is True and dev.online is True and dev.backoff == 1.0


@pytest.mark.parametrize(("timeout", "first", "last"), [(0.25, 5.0, 60.0), (1.0, 20.0, 60.0), (5.0, 100.0, 100.0)])
def test_probes_of_an_offline_unit_take_at_most_their_share_of_the_line(
    timeout: float, first: float, last: float
) -> None:
    # Each probe holds the line for a whole response timeout: with a long timeout, probing every
    # second would take a quarter of the line or more from the live devices.
    cfg = bus_config(
        """        - name: d
          unit: 1
          offline_after: 1
          points: [{name: v, table: holding, address: 0}]""",
        timeout=f"{timeout}s",
    )
    dev = Device(cfg.devices[0], cfg)
    assert dev.record_failure(0.0) is True
    waits = [dev.next_probe]
    for _ in range(8):
        dev.record_failure(0.0)
        waits.append(dev.next_probe)
    assert waits[0] == pytest.approx(first)
    assert waits[-1] == pytest.approx(last)
    assert all(timeout / w <= PROBE_LINE_SHARE + 1e-9 for w in waits)
    assert dev.record_success() is True and dev.backoff == pytest.approx(first)


async def test_rtu_over_tcp_to_a_serial_device_server() -> None:
    from helpers import free_port

    url = f"tcp://127.0.0.1:{free_port()}"
    cfg = replace(
        bus_config("""        - name: d
          unit: 4
          poll: 100ms
          points: [{name: v, table: input, address: 3, type: int32}]"""),
        port=modbus_port(url),
    )
    sim = ModbusSimulator(modbus_port(url), [SimSlave(4, [SimPoint("v", "input", 3, cfg.devices[0].points[0].codec)])])
    await sim.start()
    sim.set(4, "v", -70000)
    rec = Recorder()
    bus = ModbusBus(cfg, rec.sample, rec.state)
    await bus.start()
    try:
        deadline = time.monotonic() + 5
        while not rec.samples and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert rec.samples[0].values == {"v": -70000}
        assert [s.online for s in rec.states] == [True]
    finally:
        await bus.stop()
        await sim.stop()


async def test_stop_always_ends_a_busy_line(tmp_path: Path) -> None:
    # Regression: a cancel landing in the same loop step as a response used to be swallowed
    # inside pymodbus (asyncio.wait_for on 3.11) and stop() then waited forever.
    import random

    cfg = bus_config(
        """        - name: a
          unit: 1
          poll: 0.1ms
          points: [{name: v, table: holding, address: 0, type: uint32}]
        - name: b
          unit: 2
          poll: 0.1ms
          points: [{name: v, table: holding, address: 8}]""",
        inter_request_delay=0,
    )
    line = VirtualLine(tmp_path / "tty")
    line.start()
    sim = ModbusSimulator(line.device_port, [SimSlave(1, []), SimSlave(2, [])])
    await sim.start()
    rng = random.Random(7)
    try:
        for _ in range(40):
            bus = ModbusBus(replace(cfg, port=line.gateway_port), lambda s: None, lambda s: None)
            await bus.start()
            await asyncio.sleep(rng.uniform(0.002, 0.01))
            await asyncio.wait_for(bus.stop(), timeout=3)
    finally:
        await sim.stop()
        line.close()
