"""The Modbus part of the config schema: buses, their devices and points, templates, the Modbus TCP server."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from drivers.modbus.planner import BIT_TABLES
from gateway.errors import CodecError

from .codecs import layout_codec, named_bits, point_type
from .fields import HaDeviceClass, HaIcon, HaStateClass, Name
from .units import Duration


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
    # 1-247 on a serial line (0 is its broadcast); Modbus TCP devices addressed directly often take 0 or 255.
    unit: int = Field(ge=0, le=255)
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
        if self.line_framing != "tcp":
            for device in self.devices:
                if not 1 <= device.unit <= 247:
                    raise ValueError(
                        f"device {device.name}: unit {device.unit} is not a unit on an RTU line (1-247; "
                        "0 is its broadcast): 0-255 only on Modbus TCP"
                    )
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
    idle_timeout: Duration = Field(default=300.0, ge=0)  # a client silent this long is closed; 0: never
    cache_max_age: Duration = 2.0  # 0: every read goes to the device
    expose: list[ExposeConfig] = Field(default_factory=list)


class ModbusConfig(Model):
    """Modbus buses, reusable point templates, and the Modbus TCP server."""

    buses: list[BusConfig] = Field(default_factory=list)
    templates: dict[Name, list[PointConfig]] = Field(default_factory=dict)
    server: ModbusServerConfig | None = None
