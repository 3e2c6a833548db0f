"""The line bench's reference: the raw pyserial client measures the line's limit only in step with the line.

Through the baud-accurate line (hil/line.py) with a pymodbus slave behind it, as `make bench` runs it, but at
1200 baud so that a frame lasts tens of milliseconds: the ordering these tests set up does not depend on how
fast this machine is.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import pytest
import serial

from drivers.modbus.codec import PointCodec
from drivers.sim.modbus import ModbusSimulator, SimPoint, SimSlave
from drivers.sim.waves import Wave
from hil.line import Rs485Line, char_bits

BENCH_DIR = Path(__file__).resolve().parents[2] / "hil" / "bench"
BAUD = 1200
BITS = char_bits(8, "E", 1)
#: Read 2 holding registers of unit 1 from 0, CRC included: 8 bytes out, 9 back.
READ = bytes.fromhex("010300000002c40b")


def load_line_bench() -> ModuleType:
    """hil/bench/line_bench.py as a module (the bench folder is a set of scripts, not a package)."""
    sys.path.insert(0, str(BENCH_DIR))
    try:
        spec = importlib.util.spec_from_file_location("bench_line", BENCH_DIR / "line_bench.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH_DIR))
    return module


line_bench = load_line_bench()


@pytest.fixture
async def line(tmp_path: Path) -> AsyncIterator[Rs485Line]:
    """A 1200-baud 8E1 line with unit 1 (holding 0..1) behind it."""
    async with Rs485Line(tmp_path / "tty", baudrate=BAUD, frame_format="8E1") as rs485:
        points = [SimPoint(f"r{i}", "holding", i, PointCodec("uint16"), Wave(value=1000 + i)) for i in range(2)]
        sim = ModbusSimulator(rs485.device_port, [SimSlave(1, points)], baudrate=BAUD)
        await sim.start()
        try:
            yield rs485
        finally:
            await sim.stop()


def test_the_read_is_what_the_spec_makes_of_it() -> None:
    assert line_bench.response_length(READ) == 9
    assert line_bench._modbus_crc(READ) == 0


async def test_a_gateway_answer_still_arriving_does_not_put_the_raw_client_out_of_step(line: Rs485Line) -> None:
    # As in the bench: the gateway's bus stopped with a request on the line, and the client opens the port while
    # its answer is on the way. Taken for the client's own answer, it would put every later request on the wire
    # while an answer was still arriving (a short gap each time, a t3.5 saved): a "limit" above the wire's.
    with serial.Serial(line.gateway_port, baudrate=BAUD, timeout=line_bench.RAW_TIMEOUT) as ser:
        ser.write(READ)
        deadline = time.monotonic() + 30
        while line.stats.bytes_to_device < len(READ):  # the slave has the request: its answer comes next
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        assert line.stats.bytes_to_gateway == 0  # the answer has not begun (it waits t3.5 = 32 ms)
        done, seconds, errors = await asyncio.to_thread(line_bench.raw_transactions, ser, BAUD, BITS, [READ], 1.0, 2)
    computed = line_bench.computed_limit([READ], BAUD, BITS)
    run = line_bench.RawRun(done, seconds, errors, line.stats.short_gaps)
    assert errors == 0 and line.stats.short_gaps == 0, (errors, line.stats)
    assert done >= 1
    # A busy machine only slows the client down: it never beats the spec's arithmetic.
    assert run.rate <= computed * line_bench.RAW_OVER_COMPUTED, (run.rate, computed)
    assert run.fault(computed) == ""


def test_a_raw_run_that_was_out_of_step_or_beat_the_wire_is_no_limit() -> None:
    computed = 10.0
    assert line_bench.RawRun(50, 5.0, 0, 0).fault(computed) == ""
    assert "bad answers" in line_bench.RawRun(50, 5.0, 1, 0).fault(computed)
    assert "short gaps" in line_bench.RawRun(50, 5.0, 0, 1).fault(computed)
    assert "faster than the computed" in line_bench.RawRun(55, 5.0, 0, 0).fault(computed)
    assert "no transaction" in line_bench.RawRun(0, 5.0, 0, 0).fault(computed)


def test_a_gateway_figure_with_a_short_gap_or_above_the_wire_is_not_measured() -> None:
    assert line_bench.off_the_wire(24.0, 24.5, 0) == ""
    assert line_bench.off_the_wire(24.7, 24.5, 0) == ""  # within the clocks' disagreement
    assert "short gaps" in line_bench.off_the_wire(20.0, 24.5, 1)
    assert "faster than the computed" in line_bench.off_the_wire(27.1, 24.5, 0)  # the figure of issue 12
    assert "faster than the computed" in line_bench.off_the_wire(float("nan"), 24.5, 0)


def test_a_bad_answer_is_not_the_answer() -> None:
    good = bytes.fromhex("01030403e803e9") + b"\0\0"
    crc = line_bench._modbus_crc(good[:-2]).to_bytes(2, "little")
    good = good[:-2] + crc
    assert line_bench.answer_ok(READ, good, 9)
    assert not line_bench.answer_ok(READ, good[:-1], 9)  # short
    assert not line_bench.answer_ok(READ, good[:-1] + bytes([good[-1] ^ 1]), 9)  # CRC
    other_unit = bytes([2]) + good[1:-2]
    assert not line_bench.answer_ok(READ, other_unit + line_bench._modbus_crc(other_unit).to_bytes(2, "little"), 9)
    exception = bytes.fromhex("018302")
    assert not line_bench.answer_ok(READ, exception + line_bench._modbus_crc(exception).to_bytes(2, "little"), 5)
