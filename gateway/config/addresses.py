"""The address forms of the config, parsed once: a Modbus port (`tcp://host:port` or a serial path), `HOST:PORT`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import overload

from drivers.modbus.settings import TcpEndpoint

TCP_SCHEME = "tcp://"


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
    return TcpEndpoint(host, int(number))


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
