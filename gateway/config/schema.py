"""The typed configuration schema (contract: shared/spec/INTERFACE.md section 2)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from drivers.modbus.planner import BIT_TABLES
from gateway.errors import CodecError

from .codecs import layout_codec, named_bits, point_type
from .fields import HaDeviceClass, HaIcon, HaStateClass, Listener, Name, TopicFilter, TopicPrefix
from .units import Duration, Size


class Model(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", populate_by_name=False)


# --- modbus -------------------------------------------------------------------------------

Table = Literal["coil", "discrete", "input", "holding"]


class PointConfig(Model):
    """One value of a Modbus device."""

    name: Name
    table: Table
    address: int = Field(ge=0, le=65535)
    type: str | None = None  # default: bool on bit tables, uint16 on register tables
    byte_order: Literal["big", "little"] = "big"
    word_order: Literal["big", "little"] = "big"
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = None
    deadband: float = Field(default=0.0, ge=0)
    poll: Duration | None = None
    writable: bool = False
    min: float | None = None
    max: float | None = None
    bits: dict[int, Name] | list[Name | None] | None = None
    device_class: HaDeviceClass | None = None
    state_class: HaStateClass | None = None
    icon: HaIcon | None = None

    @model_validator(mode="after")
    def _check_point(self) -> PointConfig:
        # The runtime codec is built by config/settings.py; here its layout is only checked.
        is_bit_table = self.table in BIT_TABLES
        type_spec = point_type(self.table, self.type)
        if is_bit_table and type_spec != "bool":
            raise ValueError(f"a {self.table} point is a single bit: type must be bool, not {type_spec}")
        if self.writable and self.table not in ("coil", "holding"):
            raise ValueError(f"a {self.table} point cannot be writable (only coil and holding can)")
        if type_spec == "bitfield" and not self.bits:
            raise ValueError("a bitfield point needs `bits`: the names of the bits to publish")
        if self.bits and type_spec != "bitfield":
            raise ValueError("`bits` only goes with type: bitfield")
        if self.writable and type_spec == "bitfield":
            raise ValueError("bitfield points are read-only; declare a uint16 point to write the word")
        if (self.min is not None or self.max is not None) and not self.writable:
            raise ValueError("`min`/`max` are write limits: they need writable: true")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is greater than max {self.max:g}")
        if self.state_class and (is_bit_table or type_spec == "bitfield" or type_spec.startswith("string")):
            raise ValueError("`state_class` is for numeric points, not bool, bitfield or string ones")
        if self.state_class and self.writable:
            # A writable point is a Home Assistant `number`, which keeps no statistics.
            raise ValueError("`state_class` does not apply to a writable point (Home Assistant shows it as a number)")
        try:
            layout_codec(type_spec, self.byte_order, self.word_order, self.scale, self.offset, named_bits(self.bits))
        except CodecError as exc:
            raise ValueError(str(exc)) from None
        return self


class DeviceConfig(Model):
    """A Modbus device (unit) on a bus."""

    name: Name
    unit: int = Field(ge=1, le=247)
    poll: Duration = 1.0
    full_every: Duration = 60.0
    max_gap: int = Field(default=10, ge=0, le=125)
    max_registers: int = Field(default=125, ge=1, le=125)
    timeout: Duration | None = None
    retries: int | None = Field(default=None, ge=0, le=10)
    offline_after: int | None = Field(default=None, ge=1, le=100)
    write_rate: float = Field(default=5.0, gt=0)  # writes/s the device is given, on average
    write_burst: int = Field(default=10, ge=1)  # writes allowed at once after a quiet spell
    template: Name | None = None
    points: list[PointConfig] = Field(default_factory=list)


class Rs485Config(Model):
    """The kernel's RS-485 mode of a serial port (a transceiver on the Pi's UART): RTS drives the transmitter."""

    rts_on_send: bool = True
    rts_after_send: bool = False
    delay_before_tx: Duration | None = None
    delay_after_tx: Duration | None = None
    rx_during_tx: bool = False


class BusConfig(Model):
    """One line and the devices on it: a serial port, a Modbus TCP endpoint or a serial device server."""

    name: Name
    port: str = Field(min_length=1)
    # On a tcp:// port: tcp (Modbus TCP, MBAP header) or rtu (RTU framing to a serial device server).
    framing: Literal["tcp", "rtu"] | None = None  # None: tcp on a tcp:// port, rtu on a serial one
    connect_timeout: Duration = Field(default=3.0, gt=0)
    rs485: Rs485Config | None = None
    baudrate: int = Field(default=9600, ge=300, le=4_000_000)
    parity: Literal["N", "E", "O"] = "E"
    bytesize: Literal[7, 8] = 8
    stopbits: Literal[1, 2] = 1
    timeout: Duration | None = None  # None: derived from baud rate and response length
    retries: int = Field(default=1, ge=0, le=10)
    inter_request_delay: Duration | None = None  # None: t3.5 at this baud rate
    offline_after: int = Field(default=3, ge=1, le=100)
    devices: list[DeviceConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _port_kind(self) -> BusConfig:
        tcp = self.port.startswith("tcp://")
        if self.framing == "tcp" and not tcp:
            raise ValueError(f"framing: tcp (Modbus TCP) needs a tcp://HOST:PORT port, not {self.port!r}")
        if self.rs485 is not None and tcp:
            raise ValueError("`rs485` is for a serial port; a tcp:// port has no transceiver to drive")
        return self

    @property
    def line_framing(self) -> str:
        """The framing the line speaks: as configured, else tcp on a tcp:// port and rtu on a serial one."""
        return self.framing or ("tcp" if self.port.startswith("tcp://") else "rtu")


class ExposeConfig(Model):
    """A configured Modbus device the Modbus TCP server serves, at the unit id its clients address."""

    unit: int = Field(ge=0, le=255)
    device: Name
    writes: bool = False  # functions that write are refused (exception 1) unless allowed here
    passthrough: Literal["reads", "all"] = "reads"  # all: also functions the gateway does not poll (0x17, 0x2B, ...)


class ModbusServerConfig(Model):
    """A Modbus TCP server that shares the gateway's lines with other masters (SCADA, HMI, vendor tools)."""

    listen: str = "127.0.0.1:5020"
    max_connections: int = Field(default=16, ge=1, le=1024)
    max_queue: int = Field(default=8, ge=1, le=1024)  # one connection's requests waiting; more: exception 6
    cache_max_age: Duration = 2.0  # 0: every read goes to the device
    expose: list[ExposeConfig] = Field(default_factory=list)


class ModbusConfig(Model):
    """Modbus buses, reusable point templates, and the Modbus TCP server."""

    buses: list[BusConfig] = Field(default_factory=list)
    templates: dict[Name, list[PointConfig]] = Field(default_factory=dict)
    server: ModbusServerConfig | None = None


# --- gateway, broker, northbound --------------------------------------------------------------


def _default_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).strip(".-") or "fieldgate"
    return host[:64]


def _default_state_dir() -> str:
    # systemd sets STATE_DIRECTORY for units with StateDirectory=; INVOCATION_ID for any unit.
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    return "/var/lib/fieldgate" if os.environ.get("INVOCATION_ID") else "./var"


class AuditConfig(Model):
    """The audit log of writes and commands (`<state_dir>/audit.log`), rotated by size."""

    max_size: Size = Field(default=1024**2, ge=1024)
    backups: int = Field(default=5, ge=1, le=100)


class GatewaySection(Model):
    """Identity and process-wide settings."""

    id: Name = Field(default_factory=_default_id)
    state_dir: str = Field(default_factory=_default_state_dir)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    http: str | None = "127.0.0.1:9720"
    audit: AuditConfig = Field(default_factory=AuditConfig)


class BrokerAccess(Model):
    """What one user of the embedded broker may do: topic filters to read (subscribe) and write (publish)."""

    read: list[TopicFilter] = Field(default_factory=list)
    write: list[TopicFilter] = Field(default_factory=list)


class BrokerSection(Model):
    """The embedded MQTT broker."""

    enabled: bool = True
    process: Literal["inline", "separate"] = "separate"  # its own process, a core of its own; inline: on our loop
    listeners: list[Listener] = Field(default_factory=lambda: ["tcp://127.0.0.1:1883"], min_length=1)
    users: str | None = None  # file of `user:argon2-hash` lines (`fieldgate passwd`); none: anonymous access
    acl: dict[str, BrokerAccess] | None = None  # user -> access; none: read all, write set/cmd
    cert: str | None = None
    key: str | None = None

    @model_validator(mode="after")
    def _tls_needs_cert(self) -> BrokerSection:
        if any(u.startswith(("mqtts", "wss")) for u in self.listeners) and not (self.cert and self.key):
            raise ValueError("mqtts:// and wss:// listeners need `cert` and `key`")
        if self.acl is not None and self.users is None:
            raise ValueError("`acl` rules users of the `users` file: without one, access is anonymous and open")
        return self


class SpoolConfig(Model):
    """Store-and-forward limits of one sink, and how its backlog is replayed."""

    max_size: Size = 256 * 1024**2
    max_age: Duration = 30 * 86400.0
    when_full: Literal["drop_oldest", "reject"] = "drop_oldest"
    min_free: Size = 64 * 1024**2  # free-disk floor on the state dir's filesystem
    replay_rate: float = Field(default=500.0, gt=0)  # messages/s while a backlog drains
    order: Literal["live", "strict"] = "live"  # strict: live data waits behind the backlog
    commit_window: Duration = 0.12  # group commit: messages spooled within this window share one fsync


class SinkConfig(Model):
    """A northbound MQTT broker the gateway publishes to."""

    name: Name
    url: str | None = None  # None: the embedded broker
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    qos: Literal[0, 1] = 1
    keepalive: Duration = 30.0
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    topic_prefix: TopicPrefix | None = None  # None: fieldgate/<gateway.id>

    @model_validator(mode="after")
    def _url_scheme(self) -> SinkConfig:
        if self.url is not None and "@" in self.url:
            # Not echoed: what precedes the `@` is most likely a password.
            raise ValueError("url must not carry credentials: give them as `username` and `password`")
        if self.url is not None and not re.match(r"^mqtts?://[^:/]+(:\d{1,5})?/?$", self.url):
            raise ValueError(f"url {self.url!r}: use mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        return self


# --- mcp, homeassistant -----------------------------------------------------------------------


class TlsConfig(Model):
    """Server certificate and optional client CA."""

    cert: str
    key: str
    client_ca: str | None = None


class McpPointConfig(Model):
    """A value an MCP device pushes, declared so that Home Assistant discovery can describe it."""

    name: Name
    type: Literal["number", "bool", "string"] = "number"
    unit: str | None = None
    device_class: HaDeviceClass | None = None
    state_class: HaStateClass | None = None
    icon: HaIcon | None = None

    @model_validator(mode="after")
    def _numeric_hints(self) -> McpPointConfig:
        if self.type != "number" and (self.unit is not None or self.state_class is not None):
            raise ValueError(f"`unit` and `state_class` are for number points, not {self.type} ones")
        return self


class McpDeviceConfig(Model):
    """An MCP device allowed to connect."""

    id: Name
    # A short token can be guessed over the network; 16 characters is the least `fieldgate check` takes.
    token: str = Field(min_length=16)
    meta: dict[str, Any] = Field(default_factory=dict)
    write_rate: float = Field(default=5.0, gt=0)  # commands/s the device is given, on average
    write_burst: int = Field(default=10, ge=1)  # commands allowed at once after a quiet spell
    # MCP devices declare nothing up front: only the points listed here get discovery configs.
    points: list[McpPointConfig] = Field(default_factory=list)


class McpSection(Model):
    """The MCP/1 TCP server."""

    listen: str = "0.0.0.0:7720"
    tls: TlsConfig | None = None
    heartbeat_s: int = Field(default=30, ge=1, le=3600)
    ack_timeout: Duration = 5.0
    retries: int = Field(default=3, ge=0, le=20)
    max_payload: Size = 1024 * 1024
    max_sessions: int = Field(default=10000, ge=1)  # sessions past HELLO
    # Before HELLO nobody is trusted: a connection has `hello_timeout` from accept (TLS handshake
    # included) to log in, small frames only, a few mistakes, and its own caps apart from max_sessions.
    hello_timeout: Duration = Field(default=10.0, gt=0, le=3600)
    max_hello_payload: Size = Field(default=4096, ge=256)
    max_hello_errors: int = Field(default=3, ge=1, le=1000)
    max_pending: int = Field(default=256, ge=1)
    max_pending_per_ip: int = Field(default=32, ge=1)
    # Failed logins from one address (an IPv6 /64) within the window close its connections at accept.
    auth_ban_failures: int = Field(default=10, ge=1)
    auth_ban_window: Duration = Field(default=60.0, gt=0)
    auth_ban_time: Duration = 60.0
    # What one device may put into the gateway.
    max_points: int = Field(default=256, ge=1, le=100_000)
    max_string: Size = Field(default=1024, ge=1)
    max_unread: Size = Field(default=64 * 1024, ge=4096)
    max_future_ts: Duration = 86400.0
    devices: list[McpDeviceConfig] = Field(default_factory=list)


class HomeAssistantSection(Model):
    """Home Assistant MQTT discovery."""

    enabled: bool = False
    discovery_prefix: TopicPrefix = "homeassistant"


# --- simulator --------------------------------------------------------------------------------


class SimValue(Model):
    """How a simulated point's value moves over time (engineering units)."""

    wave: Literal["constant", "sine", "ramp", "toggle", "bits", "random"] = "constant"
    value: float | bool | str = 0
    min: float = 0.0
    max: float = 100.0
    period: Duration = 60.0
    step: float = 1.0


class SimModbusDevice(Model):
    """A virtual Modbus slave on a simulated line."""

    unit: int = Field(ge=1, le=247)
    dead: bool = False  # never answers: shows offline handling
    values: dict[str, SimValue] = Field(default_factory=dict)


class SimModbusLine(Model):
    """A virtual serial line: a pty pair whose gateway end is linked at `link`."""

    link: str = Field(min_length=1)
    devices: list[SimModbusDevice] = Field(default_factory=list)


class SimModbusTcp(Model):
    """A virtual Modbus TCP endpoint on `listen`, many units behind it; it speaks the framing of the bus polling it."""

    listen: str = Field(min_length=1)  # HOST:PORT; the bus with port tcp://HOST:PORT polls it
    devices: list[SimModbusDevice] = Field(default_factory=list)


class SimMcpDevice(Model):
    """A virtual MCP device that connects to the gateway's MCP server and pushes DATA."""

    id: Name  # must be one of mcp.devices; its token is taken from there
    interval: Duration = 5.0
    values: dict[Name, SimValue] = Field(default_factory=dict)


class SimulatorSection(Model):
    """Virtual field devices started in-process (demos and tests)."""

    modbus: list[SimModbusLine] = Field(default_factory=list)
    modbus_tcp: list[SimModbusTcp] = Field(default_factory=list)
    mcp: list[SimMcpDevice] = Field(default_factory=list)


# --- root --------------------------------------------------------------------------------------


class Config(Model):
    """The whole gateway configuration."""

    gateway: GatewaySection = Field(default_factory=GatewaySection)
    broker: BrokerSection = Field(default_factory=BrokerSection)
    northbound: list[SinkConfig] = Field(default_factory=lambda: [SinkConfig(name="local")], min_length=1)
    modbus: ModbusConfig = Field(default_factory=ModbusConfig)
    mcp: McpSection | None = None
    homeassistant: HomeAssistantSection = Field(default_factory=HomeAssistantSection)
    simulator: SimulatorSection | None = None

    def prefix_for(self, sink: SinkConfig) -> str:
        """The topic prefix a sink publishes under."""
        return sink.topic_prefix or f"fieldgate/{self.gateway.id}"

    def spool_path(self, sink: SinkConfig) -> Path:
        """The SQLite spool file of a sink, under the state dir."""
        return Path(self.gateway.state_dir) / "spool" / f"{sink.name}.sqlite"
