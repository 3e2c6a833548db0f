"""`fieldgate scan/read/write --port tcp://...` against pymodbus servers on loopback, and `fieldgate check`'s
budget on a Modbus TCP bus."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drivers.modbus.codec import PointCodec
from drivers.modbus.settings import TcpEndpoint
from drivers.sim.modbus import ModbusSimulator, SimPoint, SimSlave
from gateway.cli import main
from hil.ports import free_port

from configs import broker, config, device, line, point, write


def slaves() -> list[SimSlave]:
    """Units 3 and 17 answer, unit 5 is silent."""
    f32, i16 = PointCodec.parse("float32"), PointCodec.parse("int16")
    return [
        SimSlave(3, [SimPoint("temp", "holding", 10, f32), SimPoint("sp", "holding", 20, i16)]),
        SimSlave(17, []),
        SimSlave(5, [], dead=True),
    ]


@contextlib.asynccontextmanager
async def serving(framing: str) -> AsyncIterator[tuple[str, str, ModbusSimulator]]:
    """A loopback endpoint speaking Modbus TCP or, as a serial device server would, RTU frames: (url, framing, sim)."""
    port = free_port()
    sim = ModbusSimulator(TcpEndpoint("127.0.0.1", port), slaves(), framing=framing)
    await sim.start()
    try:
        yield f"tcp://127.0.0.1:{port}", framing, sim
    finally:
        await sim.stop()


@pytest.fixture(params=["tcp", "rtu"])
async def endpoint(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, str, ModbusSimulator]]:
    """`serving` in each framing."""
    async with serving(request.param) as served:
        yield served


def framing_args(framing: str) -> list[str]:
    """Modbus TCP is the default on tcp://; RTU framing is asked for."""
    return [] if framing == "tcp" else ["--framing", "rtu"]


async def test_scan_finds_the_units_behind_one_endpoint(
    endpoint: tuple[str, str, ModbusSimulator], capsys: pytest.CaptureFixture[str]
) -> None:
    url, framing, _ = endpoint
    args = ["scan", "--port", url, *framing_args(framing), "--units", "1-20", "--timeout", "0.1"]
    rc = await asyncio.to_thread(main, args)
    out = capsys.readouterr().out
    assert rc == 0
    assert "unit 3: answers" in out and "unit 17: answers" in out and "unit 5" not in out
    assert "2 of 20 unit ids answered" in out


async def test_the_framing_must_match_the_endpoint(
    endpoint: tuple[str, str, ModbusSimulator], capsys: pytest.CaptureFixture[str]
) -> None:
    url, framing, _ = endpoint
    other = ["--framing", "rtu"] if framing == "tcp" else []
    rc = await asyncio.to_thread(main, ["scan", "--port", url, *other, "--units", "3", "--timeout", "0.2"])
    assert rc == 0 and "0 of 1 unit ids answered" in capsys.readouterr().out


async def test_read_and_write_one_shot(
    endpoint: tuple[str, str, ModbusSimulator], capsys: pytest.CaptureFixture[str]
) -> None:
    url, framing, sim = endpoint
    sim.set(3, "temp", 21.5)
    common = ["--port", url, *framing_args(framing), "--unit", "3"]
    rc = await asyncio.to_thread(main, ["read", *common, "--address", "10", "--type", "float32"])
    assert rc == 0 and capsys.readouterr().out.strip() == "holding 10: 21.5"
    rc = await asyncio.to_thread(main, ["write", *common, "--address", "20", "--type", "int16", "--value", "-42"])
    assert rc == 0 and "device holds -42" in capsys.readouterr().out
    assert sim.get(3, "sp") == -42


async def test_modbus_tcp_timeouts_are_not_derived_from_the_baud_rate(capsys: pytest.CaptureFixture[str]) -> None:
    async with serving("tcp") as (url, _, _):
        # At 300 baud a 125-register read would be given ~10 s; Modbus TCP has no baud rate: 1 s.
        args = ["read", "--port", url, "--baud", "300", "--unit", "5", "--address", "0", "--count", "125"]
        rc = await asyncio.to_thread(main, args)
        assert rc == 1 and "unit 5: no response within 1000 ms" in capsys.readouterr().err
        args = ["read", "--port", url, "--unit", "5", "--address", "0", "--timeout", "0.25"]
        rc = await asyncio.to_thread(main, args)
        assert rc == 1 and "no response within 250 ms" in capsys.readouterr().err


def test_modbus_tcp_framing_needs_a_tcp_port(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["read", "--port", "/dev/ttyUSB0", "--framing", "tcp", "--unit", "1", "--address", "0"])
    assert rc == 2 and "--framing tcp (Modbus TCP) needs --port tcp://" in capsys.readouterr().err


async def test_a_refused_endpoint_is_a_runtime_error(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"tcp://127.0.0.1:{free_port()}"  # nothing listens
    rc = await asyncio.to_thread(main, ["read", "--port", url, "--unit", "1", "--address", "0"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith(f"fieldgate: cannot open {url}") and "Traceback" not in err


async def test_a_scan_stops_when_the_endpoint_closes_the_connection(capsys: pytest.CaptureFixture[str]) -> None:
    # Every unit after the connection is gone would look absent: the scan says what happened instead.
    port = free_port()

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", port)
    try:
        args = ["scan", "--port", f"tcp://127.0.0.1:{port}", "--units", "1-247", "--timeout", "5"]
        rc = await asyncio.to_thread(main, args)
    finally:
        server.close()
    captured = capsys.readouterr()
    assert rc == 1 and "connection closed by the peer" in captured.err
    assert "unit ids answered" not in captured.out


@pytest.mark.parametrize(("framing", "warned"), [("tcp", False), ("rtu", True)])
def test_check_budgets_wire_time_only_where_there_is_a_wire(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], framing: str, warned: bool
) -> None:
    # 20 reads every 100 ms: ~0.5 s of wire time at 9600 baud, none on Modbus TCP.
    points = [point(f"p{i}", "holding", i * 200, "uint16") for i in range(20)]
    bus = line("plc", "tcp://10.0.0.7:502", device("d", 1, poll="100ms", max_gap=0, points=points), framing=framing)
    bus.update(baudrate=9600, parity="E")
    path = write(config(broker=broker(free_port()), buses=[bus]), tmp_path)
    assert main(["check", "-c", str(path)]) == 0
    err = capsys.readouterr().err
    assert ("modbus bus plc: poll plan needs" in err) is warned
