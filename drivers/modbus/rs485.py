"""The kernel's RS-485 mode on an open serial port (pyserial's `rs485_mode`, the TIOCSRS485 ioctl).

A transceiver on the Pi's UART (an RS-485 HAT) needs its driver enabled for each transmission; with the
kernel's RS-485 mode, RTS does it. USB adapters switch by themselves and need none of this.

pyserial's names are not the config's: `rts_level_for_tx` is SER_RS485_RTS_ON_SEND (RTS while sending),
`rts_level_for_rx` is SER_RS485_RTS_AFTER_SEND (RTS after sending), `loopback` is SER_RS485_RX_DURING_TX,
and its delays are seconds, which it truncates to the kernel's whole milliseconds (`int(seconds * 1000)`).
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
from typing import Any

import serial
import serial.rs485
import serial.serialposix

from drivers.modbus.settings import Rs485Settings
from gateway.errors import BusUnavailable

log = logging.getLogger(__name__)

#: The longest RTS delay the kernel takes (serial_core's RS485_MAX_RTS_DELAY, 100 ms); it clamps longer ones.
MAX_DELAY = 0.1
# The kernel's ABI for reading the mode back (include/uapi/linux/serial.h, asm-generic/ioctls.h), as pyserial has it.
TIOCGRS485 = serial.serialposix.TIOCGRS485
SER_RS485_ENABLED = serial.serialposix.SER_RS485_ENABLED
SER_RS485_RTS_ON_SEND = serial.serialposix.SER_RS485_RTS_ON_SEND
SER_RS485_RTS_AFTER_SEND = serial.serialposix.SER_RS485_RTS_AFTER_SEND
SER_RS485_RX_DURING_TX = serial.serialposix.SER_RS485_RX_DURING_TX


def delay_ms(seconds: float) -> int:
    """A delay in the kernel's unit, whole milliseconds (the nearest: 2.9 ms is 3, where pyserial would say 2)."""
    return round(seconds * 1000)


def problems(cfg: Rs485Settings) -> list[str]:
    """What the kernel would change of these settings (a note in dmesg at most), one sentence each; empty if none.

    Each starts with the key it is about and a colon where there is one key: `fieldgate check` places it there.
    """
    found: list[str] = []
    if cfg.rts_on_send == cfg.rts_after_send:
        level = "high" if cfg.rts_on_send else "low"
        found.append(
            f"rts_on_send and rts_after_send are both {level}: RTS would never switch the transmitter "
            "(one of them must be true, the other false)"
        )
    for key in ("delay_before_tx", "delay_after_tx"):
        seconds: float | None = getattr(cfg, key)
        if seconds is None:
            continue
        if seconds > MAX_DELAY:
            found.append(f"{key}: {seconds * 1000:g} ms is longer than the kernel's longest RTS delay, 100 ms")
        elif abs(seconds * 1000 - delay_ms(seconds)) > 1e-6:
            found.append(f"{key}: {seconds * 1000:g} ms is not whole milliseconds, the kernel's unit")
    return found


def settings(cfg: Rs485Settings) -> serial.rs485.RS485Settings:
    """pyserial's form of the line's RS-485 settings; a delay not given leaves the port's own."""

    def delay(seconds: float | None) -> float | None:
        # Whole milliseconds as seconds: pyserial's int(seconds * 1000) gives them back exactly for 0-1000.
        return None if seconds is None else delay_ms(seconds) / 1000

    return serial.rs485.RS485Settings(
        rts_level_for_tx=cfg.rts_on_send,
        rts_level_for_rx=cfg.rts_after_send,
        loopback=cfg.rx_during_tx,
        delay_before_tx=delay(cfg.delay_before_tx),
        delay_before_rx=delay(cfg.delay_after_tx),
    )


def configure(client: Any, cfg: Rs485Settings) -> None:
    """Put the open port of a pymodbus serial client into RS-485 mode; BusUnavailable when the port refuses.

    pymodbus opens the port itself (`SerialTransport.sync_serial`); the mode is set on that open port.
    """
    port = getattr(getattr(client.ctx, "transport", None), "sync_serial", None)
    if port is None:
        raise BusUnavailable("RS-485 mode: the serial port is not open")
    wrong = problems(cfg)
    if wrong:
        # The kernel would put in settings of its own choosing: the transceiver would not be driven as configured.
        raise BusUnavailable(f"{port.port}: `rs485:` is not applied: " + "; ".join(wrong))
    try:
        port.rs485_mode = settings(cfg)
    except (OSError, ValueError, serial.SerialException) as exc:
        # pyserial raises a ValueError from the ioctl's OSError, whose reason is the plain one.
        cause = exc.__context__ if isinstance(exc.__context__, OSError) else exc
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        if isinstance(cause, OSError) and cause.errno == errno.ENOTTY:
            reason += ": its driver has no RS-485 support"
        raise BusUnavailable(
            f"{port.port} refuses the kernel's RS-485 mode ({reason}); `rs485:` is for a transceiver on a UART "
            "(a USB adapter switches by itself: remove `rs485:`)"
        ) from exc
    # A UART driver takes the ioctl but may drop what it cannot do (delays, receiving while sending) and says so
    # only in dmesg: read back what it applied.
    changed = differences(cfg, applied(port.fd))
    if changed:
        log.warning(
            "%s: the UART driver applied RS-485 settings other than `rs485:` asks: %s", port.port, "; ".join(changed)
        )


def applied(fd: int) -> tuple[int, int, int] | None:
    """The kernel's RS-485 flags and its two RTS delays (ms) on an open port; None where it cannot be asked."""
    buf = array.array("i", [0] * 8)  # struct serial_rs485: flags, delay before, delay after, padding
    try:
        fcntl.ioctl(fd, TIOCGRS485, buf)
    except OSError:
        return None
    return buf[0], buf[1], buf[2]


def differences(cfg: Rs485Settings, got: tuple[int, int, int] | None) -> list[str]:
    """How the kernel's RS-485 state `got` differs from the settings, one phrase per key; empty when it does not."""
    if got is None:
        return []
    flags, before_ms, after_ms = got
    found: list[str] = []
    if not flags & SER_RS485_ENABLED:
        return ["RS-485 mode is off"]
    for key, flag, wanted in (
        ("rts_on_send", SER_RS485_RTS_ON_SEND, cfg.rts_on_send),
        ("rts_after_send", SER_RS485_RTS_AFTER_SEND, cfg.rts_after_send),
        ("rx_during_tx", SER_RS485_RX_DURING_TX, cfg.rx_during_tx),
    ):
        if bool(flags & flag) != wanted:
            found.append(f"{key} is {str(bool(flags & flag)).lower()}")
    for key, seconds, ms in (
        ("delay_before_tx", cfg.delay_before_tx, before_ms),
        ("delay_after_tx", cfg.delay_after_tx, after_ms),
    ):
        if seconds is not None and ms != delay_ms(seconds):
            found.append(f"{key} is {ms} ms, not {delay_ms(seconds)} ms")
    return found
