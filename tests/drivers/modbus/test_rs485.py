"""`rs485:` on a serial bus: what the kernel is asked for (TIOCSRS485), and a port that refuses it.

No UART with RS-485 support runs here, so the kernel's side of the ioctl is stood in for where a test needs it to
accept (`KernelRs485`): the struct pyserial hands the kernel is checked field by field against the config. The
refusal is real: a pseudo-terminal refuses TIOCGRS485/TIOCSRS485 (ENOTTY), as a UART driver without RS-485 does.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import serial
import serial.serialposix

import drivers.modbus.schedule
from drivers.modbus import rs485
from drivers.modbus.bus import ModbusBus
from drivers.modbus.settings import LineSettings, Rs485Settings
from drivers.modbus.transport import ModbusLink
from drivers.sim.line import VirtualLine
from drivers.sim.modbus import ModbusSimulator, SimPoint, SimSlave
from gateway.config.settings import modbus_line
from gateway.errors import BusUnavailable, ConfigError
from hil import scenarios

from configs import device, point
from helpers import Recorder, until

# The kernel's ABI (include/uapi/linux/serial.h, asm-generic/ioctls.h), written out here rather than taken from
# pyserial, so that a pyserial that sent other bits would fail these tests.
TIOCGRS485 = 0x542E
TIOCSRS485 = 0x542F
SER_RS485_ENABLED = 1 << 0
SER_RS485_RTS_ON_SEND = 1 << 1
SER_RS485_RTS_AFTER_SEND = 1 << 2
SER_RS485_RX_DURING_TX = 1 << 4


def line_config(port: str, rs485_section: dict[str, Any] | None, **bus: object) -> LineSettings:
    """A one-device bus validated exactly like a user's config, at 115200 8N1 (a pty refuses even parity)."""
    devices = [device("plc", 1, poll="50ms", points=[point("t", "holding", 0, "uint16")])]
    keys: dict[str, object] = {"port": port, "baudrate": 115200, "parity": "N", **bus}
    if rs485_section is not None:
        keys["rs485"] = rs485_section
    return modbus_line(scenarios.bus_config(devices, **keys))


class KernelRs485:
    """The kernel's side of TIOCGRS485/TIOCSRS485 for a UART driver that supports RS-485: it keeps the struct.

    Every other ioctl goes to the real kernel (the pty), so the port opens and runs as it would.
    """

    def __init__(self, flags: int = 0, delay_before: int = 0, delay_after: int = 0) -> None:
        self.struct = [flags, delay_before, delay_after, 0, 0, 0, 0, 0]
        self.set_calls: list[list[int]] = []
        self._real = fcntl.ioctl
        #: What this driver cannot do and drops from what it is given, as serial_core does (with a dmesg note).
        self.supports_delays = True
        self.supports_rx_during_tx = True

    def ioctl(self, fd: int, request: int, arg: Any = 0, mutate: bool = True) -> Any:
        """fcntl.ioctl with the two RS-485 requests answered here."""
        if request == TIOCGRS485:
            arg[:] = array.array("i", self.struct)
            return 0
        if request == TIOCSRS485:
            self.set_calls.append(list(arg))
            self.struct = list(arg)
            if not self.supports_delays:
                self.struct[1:3] = [0, 0]
            if not self.supports_rx_during_tx:
                self.struct[0] &= ~SER_RS485_RX_DURING_TX
            return 0
        return self._real(fd, request, arg, mutate)


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> KernelRs485:
    """A UART driver with RS-485 support behind every port opened in the test (its delays start at 7 and 9 ms)."""
    k = KernelRs485(delay_before=7, delay_after=9)
    monkeypatch.setattr(serial.serialposix.fcntl, "ioctl", k.ioctl)
    return k


@pytest.fixture
def pty(tmp_path: Path) -> Iterator[VirtualLine]:
    """A virtual line; its gateway end is the port under test."""
    line = VirtualLine(tmp_path / "ttyHAT")
    yield line
    line.close()


# --- what the kernel is asked for --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "flags", "delays"),
    [
        # The defaults: RTS high while sending, low after; the port's own delays are left alone.
        ({}, SER_RS485_ENABLED | SER_RS485_RTS_ON_SEND, (7, 9)),
        # Each key moved off its default, every one at once: a key wired to the wrong field shows here.
        (
            {
                "rts_on_send": False,
                "rts_after_send": True,
                "delay_before_tx": "3ms",
                "delay_after_tx": "29ms",
                "rx_during_tx": True,
            },
            SER_RS485_ENABLED | SER_RS485_RTS_AFTER_SEND | SER_RS485_RX_DURING_TX,
            (3, 29),
        ),
        # Only the delay before sending: the one after stays as the port had it.
        ({"delay_before_tx": "1ms"}, SER_RS485_ENABLED | SER_RS485_RTS_ON_SEND, (1, 9)),
        # Zero is a delay too (none), and 100 ms the longest the kernel takes.
        ({"delay_before_tx": 0, "delay_after_tx": "100ms"}, SER_RS485_ENABLED | SER_RS485_RTS_ON_SEND, (0, 100)),
    ],
    ids=["defaults", "every-key", "one-delay", "zero-and-longest"],
)
async def test_each_rs485_key_reaches_the_kernel_field_it_names(
    pty: VirtualLine, kernel: KernelRs485, section: dict[str, Any], flags: int, delays: tuple[int, int]
) -> None:
    """README: `rs485:` is applied through the kernel's RS-485 mode: the struct TIOCSRS485 gets, from the config."""
    pty.start()
    cfg = line_config(pty.gateway_port, section)
    assert cfg.rs485 is not None
    link = ModbusLink(cfg.port, baudrate=cfg.baudrate, parity=cfg.parity, rs485=cfg.rs485)
    await link.open()
    try:
        assert link.connected
        assert len(kernel.set_calls) == 1
        got = kernel.set_calls[0]
        assert (got[0], (got[1], got[2])) == (flags, delays)
    finally:
        link.close()


def test_pyserial_settings_from_the_line_settings() -> None:
    """The mapping onto pyserial's names, which are not the config's (`rts_level_for_rx` is RTS after sending)."""
    built = rs485.settings(
        Rs485Settings(
            rts_on_send=False, rts_after_send=True, delay_before_tx=0.003, delay_after_tx=0.029, rx_during_tx=True
        )
    )
    assert (built.rts_level_for_tx, built.rts_level_for_rx, built.loopback) == (False, True, True)
    assert (int(built.delay_before_tx * 1000), int(built.delay_before_rx * 1000)) == (3, 29)
    unset = rs485.settings(Rs485Settings())
    assert (unset.delay_before_tx, unset.delay_before_rx) == (None, None)


@pytest.mark.parametrize(
    ("section", "settings", "problem"),
    [
        (
            {"rts_on_send": True, "rts_after_send": True},
            Rs485Settings(rts_on_send=True, rts_after_send=True),
            "rts_on_send and rts_after_send are both high",
        ),
        (
            {"rts_on_send": False, "rts_after_send": False},
            Rs485Settings(rts_on_send=False, rts_after_send=False),
            "rts_on_send and rts_after_send are both low",
        ),
        (
            {"delay_before_tx": "150ms"},
            Rs485Settings(delay_before_tx=0.15),
            "delay_before_tx: 150 ms is longer than the kernel's longest RTS delay",
        ),
        (
            {"delay_after_tx": "0.5ms"},
            Rs485Settings(delay_after_tx=0.0005),
            "delay_after_tx: 0.5 ms is not whole milliseconds",
        ),
    ],
    ids=["rts-both-high", "rts-both-low", "delay-too-long", "delay-below-a-millisecond"],
)
async def test_settings_the_kernel_would_change_are_refused_naming_the_key(
    pty: VirtualLine, kernel: KernelRs485, section: dict[str, Any], settings: Rs485Settings, problem: str
) -> None:
    """The kernel silently swaps equal RTS levels and clamps delays; pyserial truncates sub-millisecond ones. The
    config refuses such a section (`fieldgate check`), and so does a link given such settings directly, rather
    than drive the transceiver otherwise than asked."""
    with pytest.raises(ConfigError) as refused_config:
        line_config("/dev/ttyAMA0", section)
    assert problem.split(": ")[-1] in str(refused_config.value), str(refused_config.value)
    assert any(problem in p for p in rs485.problems(settings)), rs485.problems(settings)
    pty.start()
    link = ModbusLink(pty.gateway_port, baudrate=115200, parity="N", rs485=settings)
    with pytest.raises(BusUnavailable) as refused:
        await link.open()
    assert problem in str(refused.value) and pty.gateway_port in str(refused.value)
    assert kernel.set_calls == [] and not link.connected


# --- a port that refuses the mode (real: a pseudo-terminal) ------------------------------------------------------


async def test_a_pty_refuses_rs485_mode_with_one_clear_error_and_is_left_closed_and_unlocked(
    pty: VirtualLine,
) -> None:
    """A port whose driver has no RS-485 support: BusUnavailable naming the port and why; nothing stays open."""
    pty.start()
    link = ModbusLink(pty.gateway_port, baudrate=115200, parity="N", rs485=Rs485Settings())
    with pytest.raises(BusUnavailable) as refused:
        await link.open()
    message = str(refused.value)
    assert message.startswith(f"{pty.gateway_port} refuses the kernel's RS-485 mode (Inappropriate ioctl for device")
    assert "remove `rs485:`" in message and "\n" not in message
    assert not link.connected
    # The port was closed again: its exclusive lock is free for the next attempt (or anyone else).
    again = serial.Serial(pty.gateway_port, exclusive=True)
    again.close()


async def test_a_line_whose_port_refuses_rs485_logs_it_once_keeps_retrying_and_other_lines_poll(
    pty: VirtualLine, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One warning naming the line and the port, however many reopen attempts follow; the line retries with
    back-off (not given up) and the gateway's other line polls meanwhile."""
    # A short back-off, so that several attempts happen within the test.
    monkeypatch.setattr(drivers.modbus.schedule, "REOPEN_BACKOFF_START", 0.05)
    caplog.set_level(logging.INFO, logger="drivers.modbus.bus")
    pty.start()
    hat_rec = Recorder()
    hat = ModbusBus(line_config(pty.gateway_port, {}), hat_rec.sample, hat_rec.state)
    other_line = VirtualLine(tmp_path / "ttyUSB")
    other_line.start()
    cfg = replace(line_config(other_line.gateway_port, None), name="usb")
    codec = cfg.devices[0].points[0].codec
    sim = ModbusSimulator(other_line.device_port, [SimSlave(1, [SimPoint("t", "holding", 0, codec)])])
    await sim.start()
    usb_rec = Recorder()
    usb = ModbusBus(cfg, usb_rec.sample, usb_rec.state)
    await hat.start()
    await usb.start()
    try:
        await until(lambda: hat.stats.reopen_attempts >= 4, 30, "four attempts to open the HAT's port")
        samples = len(usb_rec.samples)
        await until(lambda: len(usb_rec.samples) > samples + 3, 20, "the other line polling")
        attempts = hat.stats.reopen_attempts
        await until(lambda: hat.stats.reopen_attempts > attempts, 30, "the HAT's line still retrying")
    finally:
        await hat.stop()
        await usb.stop()
        await sim.stop()
        other_line.close()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("line line: ")]
    assert len(said) == 1, said
    assert said[0].startswith(f"line line: {pty.gateway_port} refuses the kernel's RS-485 mode (")
    assert said[0].endswith("; retrying with back-off")
    assert [s.online for s in hat_rec.states] == [False]
    assert "refuses the kernel's RS-485 mode" in hat_rec.states[0].reason
    assert not any(r.getMessage().startswith("line usb: ") for r in caplog.records)
    assert all(s.online for s in usb_rec.states)
    # Nothing of the HAT's line reached its port's other end: no frame went out on a transceiver left undriven.
    assert pty.bytes_to_device == 0


async def test_rs485_is_applied_again_at_each_reopen(pty: VirtualLine, kernel: KernelRs485) -> None:
    """pymodbus makes a new port object at every open: the mode must be set on each, not once per line."""
    pty.start()
    link = ModbusLink(pty.gateway_port, baudrate=115200, parity="N", rs485=Rs485Settings(delay_before_tx=0.002))
    for _ in range(3):
        await link.open()
        link.close()
        await asyncio.sleep(0)
    assert len(kernel.set_calls) == 3
    assert all(call[1] == 2 for call in kernel.set_calls)


async def test_what_the_uart_driver_drops_of_the_settings_is_logged_naming_the_keys(
    pty: VirtualLine, kernel: KernelRs485, caplog: pytest.LogCaptureFixture
) -> None:
    """A driver takes TIOCSRS485 but drops what it cannot do (only dmesg says so): the mode is read back, and the
    keys it did not apply are logged with the port; the line runs on in the mode the driver gave it."""
    pty.start()
    caplog.set_level(logging.WARNING, logger="drivers.modbus.rs485")
    every_key = {"rts_on_send": True, "delay_before_tx": "2ms", "delay_after_tx": "1ms", "rx_during_tx": True}
    cfg = line_config(pty.gateway_port, every_key)
    assert cfg.rs485 is not None
    link = ModbusLink(cfg.port, baudrate=cfg.baudrate, parity=cfg.parity, rs485=cfg.rs485)
    await link.open()  # a driver that does it all: not a word
    link.close()
    assert caplog.records == []
    kernel.supports_delays = False
    kernel.supports_rx_during_tx = False
    await link.open()
    try:
        assert link.connected
    finally:
        link.close()
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        f"{pty.gateway_port}: the UART driver applied RS-485 settings other than `rs485:` asks: rx_during_tx is "
        "false; delay_before_tx is 0 ms, not 2 ms; delay_after_tx is 0 ms, not 1 ms"
    ]
