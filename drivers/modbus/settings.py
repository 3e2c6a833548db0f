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
    """A Modbus TCP device or serial device server; prints as the `tcp://host:port` it was configured as."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


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
class Rs485Settings:
    """The kernel's RS-485 mode for a transceiver on a UART (a Pi HAT): RTS drives the transmitter."""

    rts_on_send: bool = True  # RTS level while sending (True: high)
    rts_after_send: bool = False  # RTS level after sending
    delay_before_tx: float | None = None  # seconds between RTS and the first bit
    delay_after_tx: float | None = None  # seconds between the last bit and RTS back
    rx_during_tx: bool = False  # keep the receiver on while sending (hears its own frames)


@dataclass(frozen=True, slots=True)
class LineSettings:
    """One line: a serial port, a Modbus TCP endpoint or an RTU-over-TCP serial device server; its devices."""

    name: str
    port: str | TcpEndpoint  # a serial device path, or a TCP endpoint
    framing: str = "rtu"  # rtu, or tcp (MBAP) on a TCP endpoint
    connect_timeout: float = 3.0  # opening the port or connecting to the endpoint
    rs485: Rs485Settings | None = None  # a serial port's RS-485 mode; None: left as the port has it
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
        """True when the port is a TCP endpoint (Modbus TCP or a serial device server)."""
        return isinstance(self.port, TcpEndpoint)

    @property
    def mbap(self) -> bool:
        """True for Modbus TCP (MBAP header, transaction ids): no baud rate, no t3.5, no CRC."""
        return self.framing == "tcp"


@dataclass(frozen=True, slots=True)
class ExposeSettings:
    """A device the Modbus TCP server serves, at the unit id its clients address."""

    unit: int
    device: str
    writes: bool = False  # functions that write (5, 6, 15, 16, ...) are refused with exception 1 unless True
    passthrough: str = "reads"  # reads: functions 1-4 (+ writes); all: any function pymodbus knows


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The Modbus TCP server that shares the lines with other masters (SCADA, HMI, vendor tools)."""

    listen: str  # as configured, for messages
    host: str
    port: int
    max_connections: int = 16
    max_queue: int = 8  # requests of one connection waiting for a line; more get exception 6 (busy)
    idle_timeout: float = 300.0  # a connection that sent nothing this long (and waits for nothing) is closed; 0: never
    cache_max_age: float = 2.0  # a read wholly covered by raw registers polled this recently is served from them
    expose: tuple[ExposeSettings, ...] = ()
