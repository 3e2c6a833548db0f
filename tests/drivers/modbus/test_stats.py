"""The counters the status page and /metrics read: CRC errors apart from timeouts, response times, wire time."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import pytest

from drivers.modbus import budget
from drivers.modbus.bus import ModbusBus
from drivers.modbus.stats import RESPONSE_BUCKETS, BusStats, DeviceStats, count_answered_read, count_transaction
from drivers.modbus.transport import ModbusLink
from drivers.sim.line import VirtualLine
from drivers.sim.modbus import ModbusSimulator, SimSlave
from gateway.config import parse_config
from gateway.config.settings import modbus_line
from gateway.errors import BusUnavailable, CrcError, DeviceError, DeviceException, DeviceTimeout, ProtocolError


def test_response_times_land_in_their_bucket_with_le_semantics() -> None:
    stats = DeviceStats()
    stats.observe_response(RESPONSE_BUCKETS[0])  # exactly on a bound: counted in that bucket (le)
    stats.observe_response(0.007)
    stats.observe_response(RESPONSE_BUCKETS[-1] + 1)
    assert stats.response_counts[0] == 1 and stats.response_counts[1] == 1
    assert stats.response_counts[-1] == 1 and sum(stats.response_counts) == 3
    assert stats.response_sum_s == pytest.approx(RESPONSE_BUCKETS[0] + 0.007 + RESPONSE_BUCKETS[-1] + 1)
    assert stats.last_response_s == RESPONSE_BUCKETS[-1] + 1


@pytest.mark.parametrize(
    ("error", "write", "line_counts", "device_counts"),
    [
        # (transactions, timeouts, crc_errors, exceptions, errors) of the line and of the device
        (None, False, (1, 0, 0, 0, 0), (1, 0, 0, 0, 0)),
        (DeviceTimeout("no response"), False, (1, 1, 0, 0, 0), (1, 1, 0, 0, 0)),
        (CrcError("garbled"), False, (1, 0, 1, 0, 0), (1, 0, 1, 0, 0)),  # a CRC error is not also a timeout
        (DeviceException("illegal data address", 2), False, (1, 0, 0, 1, 0), (1, 0, 0, 1, 0)),
        (BusUnavailable("port lost"), False, (1, 0, 0, 0, 1), (1, 0, 0, 0, 1)),
        (ProtocolError("short answer"), False, (1, 0, 0, 0, 1), (1, 0, 0, 0, 1)),
        # A write is one of the line's transactions; the device counts it as one of its `writes` instead.
        (None, True, (1, 0, 0, 0, 0), (0, 0, 0, 0, 0)),
        (DeviceTimeout("no response"), True, (1, 1, 0, 0, 0), (0, 1, 0, 0, 0)),
    ],
)
def test_one_transaction_is_counted_once_on_the_line_and_its_device(
    error: DeviceError | None,
    write: bool,
    line_counts: tuple[int, ...],
    device_counts: tuple[int, ...],
) -> None:
    line, device = BusStats(), DeviceStats()
    count_transaction(line, device, error, write=write)
    figures = ("transactions", "timeouts", "crc_errors", "exceptions", "errors")
    assert tuple(getattr(line, f) for f in figures) == line_counts
    assert tuple(getattr(device, f) for f in figures) == device_counts
    assert line.reopen_attempts == 0 and line.wire_seconds == 0.0
    assert device.cycles == device.writes == sum(device.response_counts) == 0


def test_an_answered_read_counts_its_response_time_on_the_device_and_its_wire_time_on_the_line() -> None:
    line, a, b = BusStats(), DeviceStats(), DeviceStats()
    count_answered_read(line, a, 0.007, 0.002)
    count_answered_read(line, b, 0.03, 0.004)
    count_transaction(line, b, DeviceTimeout("no response"))
    assert (line.transactions, a.transactions, b.transactions) == (3, 1, 2)
    assert line.timeouts == b.timeouts == 1 and a.timeouts == 0
    assert line.wire_seconds == pytest.approx(0.006)
    assert a.response_counts[1] == 1 and b.response_counts[3] == 1 and sum(b.response_counts) == 1  # le 0.01, 0.05
    assert (a.last_response_s, b.last_response_s) == (0.007, 0.03)


async def test_a_garbled_answer_is_a_crc_error_and_silence_a_timeout(tmp_path: Path) -> None:
    line = VirtualLine(tmp_path / "tty")
    line.start()
    sim = ModbusSimulator(line.device_port, [SimSlave(1, [])])
    await sim.start()
    link = ModbusLink(line.gateway_port, baudrate=115200, parity="N")
    try:
        await link.open()
        assert await link.read("holding", 1, 0, 2, 0.5) == [0, 0]
        line.garble()
        with pytest.raises(CrcError, match="garbled"):
            await link.read("holding", 1, 0, 2, 0.3)
        await asyncio.sleep(0.05)
        assert await link.read("holding", 1, 0, 2, 0.5) == [0, 0]  # the line is fine again
        with pytest.raises(DeviceTimeout) as silence:
            await link.read("holding", 9, 0, 1, 0.2)  # nobody there: no bytes at all
        assert not isinstance(silence.value, CrcError)
    finally:
        link.close()
        await sim.stop()
        line.close()


async def test_bus_counts_crc_errors_response_times_and_wire_time(tmp_path: Path) -> None:
    cfg = parse_config(
        """
modbus:
  buses:
    - name: line
      port: /dev/null
      baudrate: 115200
      parity: N
      retries: 1
      devices:
        - name: d
          unit: 1
          poll: 50ms
          points: [{name: v, table: holding, address: 0, type: uint32}]
"""
    ).config.modbus.buses[0]
    line = VirtualLine(tmp_path / "tty")
    line.start()
    sim = ModbusSimulator(line.device_port, [SimSlave(1, [])])
    await sim.start()
    bus = ModbusBus(replace(modbus_line(cfg), port=line.gateway_port), lambda s: None, lambda s: None)
    await bus.start()
    device = bus.devices["d"]
    try:
        deadline = time.monotonic() + 5
        while device.stats.transactions < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        line.garble()
        while bus.stats.crc_errors == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # let the retry and a few more polls through
    finally:
        await bus.stop()
        await sim.stop()
        line.close()
    assert bus.stats.crc_errors == device.stats.crc_errors == 1
    assert bus.stats.timeouts == device.stats.timeouts == 0
    assert device.online is True  # the retry got through: noise is not an outage
    answered = device.stats.transactions - device.stats.crc_errors
    assert sum(device.stats.response_counts) == answered > 3
    assert 0 < device.stats.response_sum_s < answered * 0.5
    # Every answered read of 2 registers puts its request and response frames on the wire.
    req, resp = budget.transaction_bytes("holding", 2)
    per_read = budget.transaction_time(req, resp, 115200, budget.char_bits(8, "N", 1))
    assert bus.stats.wire_seconds == pytest.approx(answered * per_read)
