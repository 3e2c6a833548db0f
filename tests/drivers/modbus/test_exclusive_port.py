"""Serial ports are opened exclusively: a second opener gets "port busy" instead of interleaving frames.

pymodbus opens the port through pyserial with `exclusive=True` (an flock on the open port); another process, or
another link of this one, that opens the same port fails at once, before it touches the port's settings.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import serial

import drivers.modbus.schedule
from drivers.modbus.bus import ModbusBus
from drivers.modbus.settings import Rs485Settings
from drivers.modbus.transport import ModbusLink
from drivers.sim.line import VirtualLine
from gateway.config.settings import modbus_line
from gateway.errors import BusUnavailable, PortBusy
from hil import scenarios

from configs import device, point
from helpers import Recorder, until

HOLDER = """
import sys, serial
port = serial.Serial(sys.argv[1], exclusive=True)
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin
port.close()
"""


@pytest.fixture
async def pty(tmp_path: Path) -> AsyncIterator[VirtualLine]:
    """A virtual line; its gateway end is the port under test."""
    line = VirtualLine(tmp_path / "ttyA")
    line.start()
    yield line
    line.close()


@pytest.fixture
def held(pty: VirtualLine) -> Iterator[subprocess.Popen[str]]:
    """Another process that holds the port open (exclusively, as the gateway would) until the test ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, pty.gateway_port], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    yield proc
    if proc.poll() is None:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


def release(proc: subprocess.Popen[str]) -> None:
    """Let the holding process close the port and exit."""
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)


async def test_a_port_another_process_holds_is_port_busy_and_opens_once_it_is_free(
    pty: VirtualLine, held: subprocess.Popen[str]
) -> None:
    link = ModbusLink(pty.gateway_port, baudrate=115200, parity="N")
    with pytest.raises(PortBusy) as busy:
        await link.open()
    assert str(busy.value) == f"port busy: {pty.gateway_port} is in use by another process"
    assert not link.connected
    release(held)
    await link.open()
    assert link.connected
    link.close()


async def test_an_open_link_holds_its_port_exclusively(pty: VirtualLine) -> None:
    """While the gateway's link is open, nobody else gets the port: not pyserial, not another link."""
    link = ModbusLink(pty.gateway_port, baudrate=115200, parity="N")
    await link.open()
    try:
        with pytest.raises(serial.SerialException, match="Could not exclusively lock port"):
            serial.Serial(pty.gateway_port, exclusive=True)
        with pytest.raises(PortBusy):
            await ModbusLink(pty.gateway_port, baudrate=115200, parity="N").open()
    finally:
        link.close()
    # Closed, the port is free again.
    serial.Serial(pty.gateway_port, exclusive=True).close()


async def test_other_reasons_a_port_does_not_open_are_told_apart(tmp_path: Path, pty: VirtualLine) -> None:
    """A missing port and a port refusing the line's framing each say so (no bare "cannot open")."""
    missing = tmp_path / "ttyGONE"
    with pytest.raises(BusUnavailable, match=f"^cannot open {missing}: No such file or directory$") as gone:
        await ModbusLink(str(missing), parity="N").open()
    assert not isinstance(gone.value, PortBusy)
    # A pseudo-terminal refuses even parity (termios EINVAL), which pyserial raises as no OSError.
    with pytest.raises(BusUnavailable, match=r"it refuses 9600 baud 8E1 \(Invalid argument\)$"):
        await ModbusLink(pty.gateway_port, baudrate=9600, parity="E").open()


async def test_a_line_whose_port_refuses_its_framing_keeps_retrying(
    pty: VirtualLine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal is a BusUnavailable like any other: the line's task backs off and retries, it does not die."""
    monkeypatch.setattr(drivers.modbus.schedule, "REOPEN_BACKOFF_START", 0.05)
    devices = [device("plc", 1, poll="50ms", points=[point("t", "holding", 0, "uint16")])]
    cfg = modbus_line(scenarios.bus_config(devices, port=pty.gateway_port, baudrate=9600, parity="E"))
    rec = Recorder()
    bus = ModbusBus(cfg, rec.sample, rec.state)
    await bus.start()
    try:
        await until(lambda: bus.stats.reopen_attempts >= 3, 30, "three attempts to open the port")
        await asyncio.sleep(0)
        assert bus.running
    finally:
        await bus.stop()
    assert [s.online for s in rec.states] == [False]
    assert "it refuses 9600 baud 8E1" in rec.states[0].reason


def open_fds() -> int:
    """File descriptors this process has open now."""
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("why", ["rs485-refused", "busy", "framing-refused"])
async def test_an_open_failing_a_thousand_times_leaks_no_file_descriptor(pty: VirtualLine, why: str) -> None:
    """A line retries a failing open for as long as the gateway runs: each attempt must leave nothing open."""
    holder = serial.Serial(pty.gateway_port, exclusive=True) if why == "busy" else None
    link = ModbusLink(
        pty.gateway_port,
        baudrate=115200,
        parity="E" if why == "framing-refused" else "N",
        rs485=Rs485Settings() if why == "rs485-refused" else None,
    )
    try:
        with pytest.raises(BusUnavailable):
            await link.open()  # the first attempt may open what stays open for good (the loop's own pipes)
        gc.collect()  # what earlier tests left for the collector to close
        before = open_fds()
        for _ in range(1000):
            with pytest.raises(BusUnavailable):
                await link.open()
        gc.collect()
        assert open_fds() <= before
    finally:
        if holder is not None:
            holder.close()


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (errno.EBUSY, "port busy: /dev/ttyAMA0 is in use by another process"),
        (errno.EACCES, "cannot open /dev/ttyAMA0: Permission denied (is the gateway's user in the `dialout` group?)"),
    ],
    ids=["tiocexcl", "no-permission"],
)
async def test_what_only_a_non_root_user_meets_is_told_apart_too(
    monkeypatch: pytest.MonkeyPatch, code: int, said: str
) -> None:
    """EBUSY (another program set TIOCEXCL) and EACCES (not in `dialout`) spare root, which runs these tests: the
    port's open is stood in for, raising as pyserial does (its SerialException from the OS's error)."""

    def refuse(url: str, *args: object, **kwargs: object) -> serial.Serial:
        try:
            raise OSError(code, os.strerror(code), url)
        except OSError as msg:
            raise serial.SerialException(msg.errno, f"could not open port {url}: {msg}") from None

    monkeypatch.setattr(serial, "serial_for_url", refuse)
    with pytest.raises(BusUnavailable) as refused:
        await ModbusLink("/dev/ttyAMA0", parity="N").open()
    assert str(refused.value) == said
    assert isinstance(refused.value, PortBusy) == (code == errno.EBUSY)
