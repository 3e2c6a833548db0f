"""What a Modbus RTU line needs to run, as frozen values (built once from the validated config by the gateway).

Durations are seconds. Attribute names are the config keys of `modbus.buses[]`, their `devices[]` and
`points[]`, so a reader finds each one documented there. Two come parsed: a line's `port` is a serial
path or a `TcpEndpoint`, and a point carries its register codec.
"""

from __future__ import annotations

from dataclasses import dataclass

from drivers.modbus.codec import PointCodec


@dataclass(frozen=True, slots=True)
class TcpEndpoint:
    """An RTU-over-TCP serial device server; prints as the `tcp://host:port` it was configured as."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"tcp://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PointSettings:
    """One value of a Modbus device: where it lives, how its registers decode, and its write limits."""

    name: str
    table: str  # coil, discrete, input or holding
    address: int
    codec: PointCodec
    deadband: float = 0.0
    poll: float | None = None  # None: the device's poll interval
    writable: bool = False
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True, slots=True)
class DeviceSettings:
    """A Modbus device (unit) on a line: how it is polled, how its reads are planned, its write rate."""

    name: str
    unit: int
    poll: float = 1.0
    full_every: float = 60.0
    max_gap: int = 10
    max_registers: int = 125
    timeout: float | None = None  # None: the line's
    retries: int | None = None  # None: the line's
    offline_after: int | None = None  # None: the line's
    write_rate: float = 5.0  # writes/s on average
    write_burst: int = 10  # writes at once after a quiet spell
    points: tuple[PointSettings, ...] = ()


@dataclass(frozen=True, slots=True)
class LineSettings:
    """One serial line (or RTU-over-TCP serial device server), its framing and timing, and its devices."""

    name: str
    port: str | TcpEndpoint  # a serial device path, or a serial device server
    baudrate: int = 9600
    parity: str = "E"  # N, E or O
    bytesize: int = 8
    stopbits: int = 1
    timeout: float | None = None  # None: derived from the baud rate and the response length
    retries: int = 1
    inter_request_delay: float | None = None  # None: t3.5 at this baud rate
    offline_after: int = 3
    devices: tuple[DeviceSettings, ...] = ()

    @property
    def is_tcp(self) -> bool:
        """True when the port is a serial device server."""
        return isinstance(self.port, TcpEndpoint)
