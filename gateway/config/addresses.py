"""The address forms of the config, parsed once: a Modbus port (`tcp://host:port` or a serial path), `HOST:PORT`."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import overload

from drivers.modbus.settings import TcpEndpoint

TCP_SCHEME = "tcp://"
#: `HOST:PORT`, `[v6]:PORT` or `:PORT` as `fieldgate check` accepts a listen address.
_LISTEN = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^:\[\]]*):(\d{1,5})$")


def is_tcp(port: str) -> bool:
    """True when a Modbus port is a serial device server (`tcp://host:port`), not a serial path."""
    return port.startswith(TCP_SCHEME)


def resolve_path(path: str, base: Path) -> str:
    """A relative serial path or link is taken relative to the config file's folder."""
    if is_tcp(path) or Path(path).is_absolute():
        return path
    # Normalised, not resolved: the path may be a link to a pty left behind by a killed run.
    return os.path.normpath(base / path)


def modbus_port(port: str) -> str | TcpEndpoint:
    """A Modbus port as the line opens it: a serial path as it is, `tcp://host:port` as a TcpEndpoint.

    ValueError when a `tcp://` port has no number after its last colon.
    """
    if not is_tcp(port):
        return port
    host, _, number = port[len(TCP_SCHEME) :].rpartition(":")
    return TcpEndpoint(host.strip("[]"), int(number))  # an IPv6 address without its brackets, as sockets take it


@overload
def split_listen(listen: str, every_interface: str) -> tuple[str, int]: ...
@overload
def split_listen(listen: str, every_interface: None = None) -> tuple[str | None, int]: ...
def split_listen(listen: str, every_interface: str | None = None) -> tuple[str | None, int]:
    """`HOST:PORT`, `[v6]:PORT` or `:PORT` as (host, port); an empty host is `every_interface`.

    Callers differ in how they name every interface: asyncio takes "0.0.0.0", aiohttp takes None.
    """
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or every_interface, int(port)


def host_port(address: str) -> tuple[str, int] | None:
    """Split `HOST:PORT` (`[v6]:PORT`, `:PORT`) as written (brackets kept); None if it is not one."""
    m = _LISTEN.match(address)
    if not m or not 0 < int(m.group(2)) < 65536:
        return None
    return m.group(1), int(m.group(2))


def exposed(address: str) -> str | None:
    """`HOST:PORT` as listened on, if `address` reaches beyond loopback; else None."""
    hostport = host_port(address)
    if hostport is None or _is_loopback(hostport[0]):
        return None
    return f"{hostport[0] or '0.0.0.0'}:{hostport[1]}"


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # empty (all interfaces) or a name that may resolve anywhere


def port_key(port: str) -> str:
    """A port compared by what it names: `./var/tty0` and `var/tty0` are one line, `tcp://PLC:502` and
    `tcp://plc:502` one endpoint (host names are not case-sensitive), `tcp://[::1]:502` is `tcp://::1:502`."""
    if is_tcp(port):
        host, sep, number = port[len(TCP_SCHEME) :].rpartition(":")
        return f"{TCP_SCHEME}{host.strip('[]').lower()}{sep}{number}" if sep else port.lower()
    return port if "://" in port else os.path.normpath(port)
