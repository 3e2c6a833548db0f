"""The `fieldgate` command line: exit codes, messages, and the commissioning tools on a simulated line."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drivers.modbus.codec import PointCodec
from drivers.sim.line import VirtualLine
from drivers.sim.modbus import ModbusSimulator, SimPoint, SimSlave
from gateway import __version__
from gateway.cli import main

ROOT = Path(__file__).parents[2]


def fieldgate(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run the real command (`python -m gateway`) and capture its output."""
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_version() -> None:
    r = fieldgate("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"fieldgate {__version__}"


def test_check_accepts_the_shipped_config() -> None:
    r = fieldgate("check", "-c", "config.yaml")
    assert r.returncode == 0, r.stderr
    assert "config.yaml: ok — 2 modbus bus(es), 6 device(s)" in r.stdout


def test_missing_config_and_bad_usage_exit_2(tmp_path: Path) -> None:
    r = fieldgate("check", "-c", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "nope.yaml" in r.stderr and "Traceback" not in r.stderr
    r = fieldgate("read", "--port", "/dev/null")
    assert r.returncode == 2 and "--unit" in r.stderr
    r = fieldgate("scan", "--port", str(tmp_path / "nothing"), "--units", "1-300")
    assert r.returncode == 2 and "outside 1-247" in r.stderr


def test_unopenable_port_is_a_runtime_error(tmp_path: Path) -> None:
    r = fieldgate("read", "--port", str(tmp_path / "ttyUSB9"), "--unit", "1", "--address", "0", "--parity", "N")
    assert r.returncode == 1
    assert r.stderr.strip().startswith("fieldgate: cannot open") and "Traceback" not in r.stderr


@pytest.fixture
async def line(tmp_path: Path) -> AsyncIterator[tuple[str, ModbusSimulator]]:
    """A virtual line with slaves at units 3 and 17 (and a silent unit 5)."""
    vl = VirtualLine(tmp_path / "tty")
    vl.start()
    f32 = PointCodec.parse("float32")
    sim = ModbusSimulator(
        vl.device_port,
        [
            SimSlave(
                3, [SimPoint("temp", "holding", 10, f32), SimPoint("sp", "holding", 20, PointCodec.parse("int16"))]
            ),
            SimSlave(17, []),
            SimSlave(5, [], dead=True),
        ],
    )
    await sim.start()
    try:
        yield vl.gateway_port, sim
    finally:
        await sim.stop()
        vl.close()


async def test_scan_finds_the_units_that_answer(
    line: tuple[str, ModbusSimulator], capsys: pytest.CaptureFixture[str]
) -> None:
    port, _ = line
    rc = await asyncio.to_thread(
        main, ["scan", "--port", port, "--parity", "N", "--baud", "115200", "--units", "1-20", "--timeout", "0.05"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "unit 3: answers" in out and "unit 17: answers" in out and "unit 5" not in out
    assert "2 of 20 unit ids answered" in out


async def test_read_and_write_one_shot(line: tuple[str, ModbusSimulator], capsys: pytest.CaptureFixture[str]) -> None:
    port, sim = line
    sim.set(3, "temp", 21.5)
    common = ["--port", port, "--parity", "N", "--baud", "115200", "--unit", "3"]
    rc = await asyncio.to_thread(main, ["read", *common, "--address", "10", "--type", "float32"])
    assert rc == 0 and capsys.readouterr().out.strip() == "holding 10: 21.5"
    rc = await asyncio.to_thread(main, ["write", *common, "--address", "20", "--type", "int16", "--value", "-42"])
    assert rc == 0 and "device holds -42" in capsys.readouterr().out
    assert sim.get(3, "sp") == -42
    rc = await asyncio.to_thread(main, ["write", *common, "--address", "20", "--type", "int16", "--value", "40000"])
    assert rc == 2 and "does not fit int16" in capsys.readouterr().err
    assert sim.get(3, "sp") == -42
