"""The line side of the Modbus TCP server on a real pty line with a pymodbus slave: pass-through and raw writes.

A client's request is carried out on the line as it came (pymodbus PDUs), in the line's own schedule; the
answers come back unchanged, exception responses included. A client's write invalidates the device's raw
cache for the written range and the configured points it touched are read back and published.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.bit_message import (
    ReadCoilsRequest,
    WriteMultipleCoilsRequest,
    WriteSingleCoilRequest,
)
from pymodbus.pdu.register_message import (
    MaskWriteRegisterRequest,
    ReadHoldingRegistersRequest,
    ReadWriteMultipleRegistersRequest,
    WriteMultipleRegistersRequest,
    WriteSingleRegisterRequest,
)

from drivers.modbus.bus import ModbusBus
from drivers.modbus.device import Device
from drivers.modbus.served import PendingPassthrough, passthrough_timeout, raw_write_timeout
from drivers.modbus.transport import ModbusLink
from drivers.modbus.writes import readback_requests, written_range
from drivers.sim.line import VirtualLine
from drivers.sim.modbus import ModbusSimulator, SimPoint, SimSlave
from gateway.config.settings import modbus_line
from gateway.errors import BusUnavailable, DeviceError, DeviceTimeout
from hil import scenarios

from configs import device, point
from helpers import Recorder, until

#: Addresses beyond the simulated slave's registers: it answers exception 2 (illegal data address).
BEYOND = 60000


@dataclass
class Rig:
    """A bus on a pty line to one pymodbus slave (unit 1) holding `sp` at 10, `sp2` at 11 and `other` at 40."""

    bus: ModbusBus
    sim: ModbusSimulator
    rec: Recorder


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    """The line, its slave and a bus polling points sp, sp2 (holding 10, 11) once at start (poll: 1 h)."""
    points = [point("sp", "holding", 10), point("sp2", "holding", 11), point("other", "holding", 40)]
    cfg = modbus_line(
        scenarios.bus_config([device("d", 1, poll="1h", max_gap=0, points=points)], baudrate=115200, parity="N")
    )
    line = VirtualLine(tmp_path / "tty")
    line.start()
    sim = ModbusSimulator(
        line.device_port, [SimSlave(1, [SimPoint(p.name, p.table, p.address, p.codec) for p in cfg.devices[0].points])]
    )
    await sim.start()
    for name, value in (("sp", 7), ("sp2", 8), ("other", 9)):
        sim.set(1, name, value)
    rec = Recorder()
    bus = ModbusBus(replace(cfg, port=line.gateway_port), rec.sample, rec.state)
    await bus.start()
    try:
        await until(lambda: rec.samples, what="the first poll")
        yield Rig(bus, sim, rec)
    finally:
        await bus.stop()
        await sim.stop()
        line.close()


async def test_a_pass_through_read_comes_back_as_the_slave_answered_and_is_counted_apart(rig: Rig) -> None:
    polled = rig.bus.stats.transactions
    response = await rig.bus.pass_through("d", ReadHoldingRegistersRequest(address=40, count=3))
    assert not response.isError() and list(response.registers) == [9, 0, 0]
    refused = await rig.bus.pass_through("d", ReadHoldingRegistersRequest(address=BEYOND, count=2))
    # The device's exception response, unchanged (0x83, exception 2), for the server to pass on.
    assert refused.isError() and refused.function_code == 0x83 and refused.exception_code == 2
    assert (rig.bus.stats.passthrough, rig.bus.stats.passthrough_failed) == (2, 0)
    assert rig.bus.stats.transactions == polled  # the line's own transactions are its polls and writes


async def test_a_device_that_died_between_rare_polls_goes_offline_by_its_clients_reads(rig: Rig) -> None:
    # Polled hourly, the device dies: its clients' reads time out as a poll's would, and after `offline_after`
    # (3) of them it is offline, so that the next client gets its 0x0B at once instead of a timeout on the line.
    rig.sim.set_dead(1)
    tried = rig.bus.stats.passthrough
    # Six clients' reads queued at once: three time out, the three still waiting are refused off the line.
    reads = [rig.bus.pass_through("d", ReadHoldingRegistersRequest(address=40, count=1)) for _ in range(6)]
    outcomes = await asyncio.gather(*reads, return_exceptions=True)
    assert [type(o) for o in outcomes] == [DeviceTimeout] * 3 + [DeviceError] * 3, outcomes
    assert rig.bus.stats.passthrough == tried + 3
    assert [(s.device, s.online) for s in rig.rec.states] == [("d", True), ("d", False)]
    tried = rig.bus.stats.passthrough
    with pytest.raises(DeviceError, match="offline"):
        await rig.bus.pass_through("d", ReadHoldingRegistersRequest(address=40, count=1))
    assert rig.bus.stats.passthrough == tried  # refused before the line
    # It comes back by its probes, as any offline device does.
    rig.sim.set_dead(1, False)
    await until(lambda: rig.bus.devices["d"].online is True, timeout=30, what="the probe that finds it back")


async def test_a_raw_write_reaches_the_slave_invalidates_the_cache_and_publishes_the_read_back(rig: Rig) -> None:
    device = rig.bus.devices["d"]
    assert device.cache.lookup("holding", 10, 2, 0.0) == [7, 8]
    samples = len(rig.rec.samples)
    response = await rig.bus.raw_write(
        "d", WriteMultipleRegistersRequest(address=10, registers=[1234, 4321]), "modbus-tcp 127.0.0.1:50000"
    )
    assert not response.isError() and (response.function_code, response.address, response.count) == (16, 10, 2)
    assert (rig.sim.get(1, "sp"), rig.sim.get(1, "sp2")) == (1234, 4321)
    # Answered before the read-back ran: the cache must not serve the values the write replaced.
    assert device.cache.lookup("holding", 10, 2, 0.0) in (None, [1234, 4321])
    sample = await until(lambda: rig.rec.samples[samples:], what="the read-back's sample")
    # The points the write touched, read back in one planned block; `other` was not touched.
    assert [s.values for s in sample] == [{"sp": 1234, "sp2": 4321}]
    assert device.cache.lookup("holding", 10, 2, 0.0) == [1234, 4321]
    assert device.stats.writes == 1


async def test_a_device_exception_to_a_raw_write_is_passed_on_unchanged_and_nothing_is_read_back(rig: Rig) -> None:
    before = rig.bus.stats.transactions
    samples = len(rig.rec.samples)
    response = await rig.bus.raw_write("d", WriteSingleRegisterRequest(address=BEYOND, registers=[1]), "modbus-tcp x")
    assert response.isError() and response.function_code == 0x86 and response.exception_code == 2
    # One write transaction, counted as the device's exception; no read-back followed.
    assert rig.bus.stats.transactions == before + 1 and rig.bus.stats.exceptions == 1
    await rig.bus.pass_through("d", ReadHoldingRegistersRequest(address=40, count=1))  # the line moved on
    assert rig.rec.samples[samples:] == []


async def test_a_pass_through_whose_client_went_away_never_reaches_the_line(rig: Rig) -> None:
    gone = asyncio.create_task(rig.bus.pass_through("d", ReadHoldingRegistersRequest(address=40, count=1)))
    await asyncio.sleep(0)  # queued for the line, which has not taken it yet
    assert rig.bus.passthrough_waiting == 1
    gone.cancel()
    response = await rig.bus.pass_through("d", ReadHoldingRegistersRequest(address=41, count=1))
    assert not response.isError()
    assert rig.bus.stats.passthrough == 1


async def test_requests_waiting_when_the_line_stops_fail_as_line_unavailable(rig: Rig) -> None:
    waiting = [
        asyncio.create_task(rig.bus.pass_through("d", ReadHoldingRegistersRequest(address=40, count=1))),
        asyncio.create_task(rig.bus.raw_write("d", WriteSingleRegisterRequest(address=10, registers=[5]), "x")),
    ]
    await asyncio.sleep(0)
    await rig.bus.stop()
    for task in waiting:
        with pytest.raises(BusUnavailable):
            await task
    with pytest.raises(BusUnavailable):
        await rig.bus.pass_through("d", ReadHoldingRegistersRequest(address=40, count=1))


class LosingLink(ModbusLink):
    """A real link whose first pass-through finds the port gone once `lose` is set (as an unplugged adapter)."""

    def __init__(self, port: str) -> None:
        super().__init__(port, baudrate=115200, parity="N")
        self.lose = asyncio.Event()
        self.lost = False

    async def execute(self, request: ModbusPDU, unit: int, timeout: float) -> ModbusPDU:
        """The pass-through, or the port's loss the first time."""
        if self.lost:
            return await super().execute(request, unit, timeout)
        self.lost = True
        await self.lose.wait()
        self.close()
        raise BusUnavailable(f"{self.port}: the port went away")


async def test_clients_waiting_for_a_line_whose_port_is_lost_are_told_at_once_not_when_it_returns(
    tmp_path: Path,
) -> None:
    cfg = modbus_line(
        scenarios.bus_config(
            [device("d", 1, poll="1h", points=[point("sp", "holding", 10)])], baudrate=115200, parity="N"
        )
    )
    line = VirtualLine(tmp_path / "tty")
    line.start()
    sim = ModbusSimulator(
        line.device_port, [SimSlave(1, [SimPoint("sp", "holding", 10, cfg.devices[0].points[0].codec)])]
    )
    await sim.start()
    rec = Recorder()
    link = LosingLink(line.gateway_port)
    bus = ModbusBus(replace(cfg, port=line.gateway_port), rec.sample, rec.state, link=link)
    await bus.start()
    try:
        await until(lambda: rec.samples, what="the first poll")
        read = ReadHoldingRegistersRequest(address=40, count=1)
        first = asyncio.create_task(bus.pass_through("d", read))
        await until(lambda: link.lost, what="the first pass-through on the line")
        waiting = [
            asyncio.create_task(bus.pass_through("d", ReadHoldingRegistersRequest(address=41, count=1))),
            asyncio.create_task(bus.raw_write("d", WriteSingleRegisterRequest(address=10, registers=[5]), "x")),
        ]
        await asyncio.sleep(0)
        line.close()  # the adapter is gone for good: the port cannot be opened again
        link.lose.set()
        with pytest.raises(BusUnavailable, match="went away"):
            await first
        for task in waiting:
            with pytest.raises(BusUnavailable, match="is down"):
                await asyncio.wait_for(task, 10)  # the line retries the port for minutes: not that long
        assert sim.requests == 1  # the first poll's: neither request reached the slave
    finally:
        await bus.stop()
        await sim.stop()
        line.close()


# --- what a client's write touches (no I/O) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_pdu", "written"),
    [
        (WriteSingleRegisterRequest(address=7, registers=[1]), ("holding", 7, 1)),
        (WriteMultipleRegistersRequest(address=100, registers=[1, 2, 3]), ("holding", 100, 3)),
        (WriteSingleCoilRequest(address=9, bits=[True]), ("coil", 9, 1)),
        (WriteMultipleCoilsRequest(address=16, bits=[True] * 11), ("coil", 16, 11)),
        (MaskWriteRegisterRequest(address=4, and_mask=0x00FF, or_mask=0x0100), ("holding", 4, 1)),
        # Read/write multiple registers: the range it writes, not the one it reads.
        (
            ReadWriteMultipleRegistersRequest(read_address=0, read_count=5, write_address=30, write_registers=[1, 2]),
            ("holding", 30, 2),
        ),
        (ReadHoldingRegistersRequest(address=0, count=5), None),
        (ReadCoilsRequest(address=0, count=5), None),
    ],
    ids=lambda x: type(x).__name__ if not isinstance(x, tuple | type(None)) else str(x),
)
def test_the_range_a_client_request_writes(request_pdu: ModbusPDU, written: tuple[str, int, int] | None) -> None:
    assert written_range(request_pdu) == written


def test_a_write_reads_back_only_the_configured_points_it_touched_in_planned_blocks() -> None:
    points = [
        point("a", "holding", 10),
        point("b", "holding", 11, "float32"),  # 11..12
        point("c", "holding", 20),
        point("k", "coil", 10),
    ]
    cfg = modbus_line(scenarios.bus_config([device("d", 1, max_gap=0, points=points)], baudrate=115200, parity="N"))
    dev = Device(cfg.devices[0], cfg)

    def reads(table: str, address: int, count: int) -> list[tuple[str, int, int, list[str]]]:
        return [
            (r.table, r.address, r.count, [s.key for s in r.spans])
            for r in readback_requests(dev, table, address, count)
        ]

    assert reads("holding", 12, 1) == [("holding", 11, 2, ["b"])]  # half of a float32 is the whole point read back
    assert reads("holding", 9, 4) == [("holding", 10, 3, ["a", "b"])]
    assert reads("holding", 10, 11) == [("holding", 10, 3, ["a", "b"]), ("holding", 20, 1, ["c"])]
    assert reads("coil", 10, 1) == [("coil", 10, 1, ["k"])]
    assert reads("holding", 13, 7) == []  # nothing configured there: nothing to publish
    assert reads("input", 10, 1) == []


def test_a_client_reads_timeout_is_its_own_reads_not_the_longest() -> None:
    cfg = modbus_line(scenarios.bus_config([device("d", 1, points=[point("v", "holding", 0)])], baudrate=9600))
    dev = Device(cfg.devices[0], cfg)
    short, long = ReadHoldingRegistersRequest(address=0, count=2), ReadHoldingRegistersRequest(address=0, count=125)
    assert passthrough_timeout(dev, short) == dev.timeout("holding", 2) < passthrough_timeout(dev, long)
    assert passthrough_timeout(dev, ReadCoilsRequest(address=0, count=16)) == dev.timeout("coil", 16)
    # A function whose answer's size is not known from the request: the longest a read may take.
    assert passthrough_timeout(dev, MaskWriteRegisterRequest(address=0)) == dev.timeout("holding", 125)


async def test_a_waiting_client_read_is_expected_to_take_as_long_as_its_devices_last_answer(rig: Rig) -> None:
    # The schedule fits a pass-through between polls by this: a whole timeout would never fit a busy line.
    device = rig.bus.devices["d"]
    pending = PendingPassthrough(device, ReadHoldingRegistersRequest(address=40, count=1), 0.5, asyncio.Future())
    assert 0 < device.stats.last_response_s == pending.expected < pending.timeout
    device.stats.last_response_s = 0.0  # no answer yet: the timeout is all that is known
    assert pending.expected == 0.5


def test_a_client_writes_timeout_fits_what_it_writes_and_what_it_reads_back() -> None:
    cfg = modbus_line(scenarios.bus_config([device("d", 1, points=[point("v", "holding", 0)])], baudrate=9600))
    dev = Device(cfg.devices[0], cfg)
    single = WriteSingleRegisterRequest(address=0, registers=[1])
    assert raw_write_timeout(dev, single) == dev.timeout("holding", 1, write=True)
    # A read/write of 121 registers answers with all of them: a 1-register write's timeout ends long before.
    readwrite = ReadWriteMultipleRegistersRequest(read_address=0, read_count=121, write_address=0, write_registers=[1])
    assert raw_write_timeout(dev, readwrite) >= dev.timeout("holding", 121) > dev.timeout("holding", 1, write=True)
