"""What a Modbus line reports of itself: a frozen snapshot of its counters, devices and liveness."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any, ClassVar, Protocol

from gateway.types import ModbusDeviceCounters, ModbusDeviceSnapshot, ModbusLineCounters, ModbusLineSnapshot


class _Counters(Protocol):
    """A dataclass of counters (the line's or a device's)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]


class _Serial(Protocol):
    """The line's settings the snapshot names: its port and character framing."""

    @property
    def port(self) -> object: ...
    @property
    def baudrate(self) -> int: ...
    @property
    def bytesize(self) -> int: ...
    @property
    def parity(self) -> str: ...
    @property
    def stopbits(self) -> float: ...
    @property
    def mbap(self) -> bool: ...


class ReportingDevice(Protocol):
    """A device as the line holds it at run time."""

    @property
    def name(self) -> str: ...
    @property
    def unit(self) -> int: ...
    @property
    def online(self) -> bool | None: ...
    @property
    def stats(self) -> _Counters: ...


def device_snapshot(device: ReportingDevice) -> ModbusDeviceSnapshot:
    """One device's counters and state, copied."""
    counters = asdict(device.stats)
    counters["response_counts"] = tuple(counters["response_counts"])
    return ModbusDeviceSnapshot(device.name, device.unit, device.online, ModbusDeviceCounters(**counters))


def line_snapshot(
    name: str,
    cfg: _Serial,
    stats: _Counters,
    devices: Iterable[ReportingDevice],
    *,
    running: bool,
    stopping: bool,
    alive_at: float,
    alive_limit: float,
) -> ModbusLineSnapshot:
    """The line's counters, its devices' and its liveness, copied."""
    return ModbusLineSnapshot(
        name=name,
        port=str(cfg.port),
        # A Modbus TCP line has no character framing; RTU over TCP keeps the serial side's, as configured.
        framing="Modbus TCP" if cfg.mbap else f"{cfg.baudrate} {cfg.bytesize}{cfg.parity}{cfg.stopbits:g}",
        running=running,
        stopping=stopping,
        alive_at=alive_at,
        alive_limit=alive_limit,
        counters=ModbusLineCounters(**asdict(stats)),
        devices=tuple(device_snapshot(d) for d in devices),
    )
