"""The kernel's RS-485 mode on an open serial port (pyserial's `rs485_mode`, the TIOCSRS485 ioctl).

A transceiver on the Pi's UART (an RS-485 HAT) needs its driver enabled for each transmission; with the
kernel's RS-485 mode, RTS does it. USB adapters switch by themselves and need none of this.
"""

from __future__ import annotations

from typing import Any

import serial.rs485

from drivers.modbus.settings import Rs485Settings
from gateway.errors import BusUnavailable


def settings(cfg: Rs485Settings) -> serial.rs485.RS485Settings:
    """pyserial's form of the line's RS-485 settings."""
    return serial.rs485.RS485Settings(
        rts_level_for_tx=cfg.rts_on_send,
        rts_level_for_rx=cfg.rts_after_send,
        loopback=cfg.rx_during_tx,
        delay_before_tx=cfg.delay_before_tx,
        delay_before_rx=cfg.delay_after_tx,
    )


def configure(client: Any, cfg: Rs485Settings) -> None:
    """Put the open port of a pymodbus serial client into RS-485 mode; BusUnavailable when the port refuses.

    pymodbus opens the port itself (`SerialTransport.sync_serial`); the mode is set on that open port.
    """
    port = getattr(getattr(client.ctx, "transport", None), "sync_serial", None)
    if port is None:
        raise BusUnavailable("RS-485 mode: the serial port is not open")
    try:
        port.rs485_mode = settings(cfg)
    except (OSError, ValueError, serial.SerialException) as exc:
        raise BusUnavailable(
            f"{port.port} refuses the kernel's RS-485 mode ({exc}): it is no UART with RS-485 support "
            "(a USB adapter switches by itself: remove `rs485:`)"
        ) from exc
