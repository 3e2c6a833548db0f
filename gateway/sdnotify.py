"""The sd_notify protocol: `KEY=value` lines in one datagram to the Unix socket systemd names in `NOTIFY_SOCKET`.

`@name` is in the abstract namespace. Outside systemd the variable is unset and every call is a no-op
that returns False. See sd_notify(3) and systemd.service(5) (`Type=notify`, `WatchdogSec=`).
"""

from __future__ import annotations

import logging
import os
import socket

# The logger name these lines had before the split (sd_notify was systemd.py's):
# journal filters keep working.
log = logging.getLogger("gateway.systemd")


def socket_address() -> str | None:
    """The address `NOTIFY_SOCKET` names, as `sendto` takes it; None when unset or of a kind not spoken here."""
    raw = os.environ.get("NOTIFY_SOCKET", "")
    if raw.startswith("@"):
        return "\0" + raw[1:]  # Linux abstract namespace
    if raw.startswith("/"):
        return raw
    return None  # unset, or a kind we do not speak (vsock:)


def notify(**fields: object) -> bool:
    """Send `KEY=value` fields (`notify(READY=1, STATUS="...")`) to systemd; False when not under it or not sent."""
    address = socket_address()
    if address is None or not fields:
        return False
    # One field per line: a value must not smuggle in a line of its own.
    text = "\n".join(f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items())
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never wait on the event loop: a full queue at systemd's end drops this one message.
            sock.setblocking(False)
            sock.sendto(text.encode(), address)
    except OSError as exc:
        log.debug("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def ready(status: str | None = None) -> bool:
    """READY=1: start-up is complete (with a first STATUS line when given)."""
    return notify(READY=1, STATUS=status) if status else notify(READY=1)


def status(text: str) -> bool:
    """STATUS=: the one line `systemctl status` shows."""
    return notify(STATUS=text)


def watchdog_ping() -> bool:
    """WATCHDOG=1: the service is alive."""
    return notify(WATCHDOG=1)


def stopping(status: str | None = None) -> bool:
    """STOPPING=1: shutdown has begun."""
    return notify(STOPPING=1, STATUS=status) if status else notify(STOPPING=1)


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings: half of `WATCHDOG_USEC`; None when systemd wants none from this process."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # inherited from the process systemd meant (sd_watchdog_enabled does the same)
    return usec / 2e6
