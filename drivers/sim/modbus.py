"""Virtual Modbus slaves for demos and tests, served by pymodbus: RTU over a serial port, or a TCP endpoint.

On a TCP endpoint the slaves speak Modbus TCP (MBAP framing: a PLC, a meter or a Modbus TCP to RTU
converter with many unit ids behind one address) or RTU frames (a serial device server).

Each simulated point follows a wave in engineering units; the value is encoded with the
point's own codec at the moment a request reads it, so a test can compare what the gateway
published with what the slave held at that time. A point that was written (over the bus or
with `set`) holds its value from then on.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.modbus.codec import Decoded, PointCodec
from drivers.modbus.planner import BIT_TABLES
from drivers.modbus.settings import TcpEndpoint
from drivers.sim.waves import Wave
from gateway.errors import BusUnavailable
from gateway.types import Value

log = logging.getLogger(__name__)

_TABLE_OF_FC = {1: "coil", 5: "coil", 15: "coil", 2: "discrete", 4: "input"}
_TABLE_OF_FC.update({fc: "holding" for fc in (3, 6, 16, 22, 23)})
_BLOCK_ID = {"coil": "c", "discrete": "d", "holding": "h", "input": "i"}
# Registers beyond the last point stay readable, so that merged reads across gaps succeed.
_SLACK = 128


@dataclass(slots=True)
class SimPoint:
    """A point of a simulated slave: where it lives and how it moves."""

    name: str
    table: str
    address: int
    codec: PointCodec
    wave: Wave = field(default_factory=Wave)
    held: bool = False

    @property
    def seed(self) -> int:
        """A stable per-point seed for the random wave."""
        return zlib.crc32(self.name.encode())


@dataclass(slots=True)
class SimSlave:
    """One simulated unit id on the line."""

    unit: int
    points: list[SimPoint]
    dead: bool = False


def _bind_error(port: str | TcpEndpoint) -> str:
    """Why a listening socket cannot be had on `port` (the OS's reason), or a plain guess when it now can."""
    if isinstance(port, TcpEndpoint):
        try:
            socket.create_server((port.host, port.port)).close()
        except OSError as exc:
            return os.strerror(exc.errno) if exc.errno else str(exc)
    return "the port cannot be opened"


class ModbusSimulator:
    """A pymodbus server answering for several unit ids on one serial port or one TCP endpoint."""

    def __init__(
        self, port: str | TcpEndpoint, slaves: Sequence[SimSlave], *, baudrate: int = 9600, framing: str = "rtu"
    ) -> None:
        if framing not in ("rtu", "tcp") or (framing == "tcp" and not isinstance(port, TcpEndpoint)):
            raise ValueError(f"framing {framing!r} cannot be served on {port}")
        self.port = port
        self.framing = framing  # on a TcpEndpoint: tcp (Modbus TCP, MBAP) or rtu (a serial device server)
        self.slaves = {s.unit: s for s in slaves}
        self._baudrate = baudrate
        self._server: ModbusSerialServer | ModbusTcpServer | None = None
        self._blocks: dict[int, dict[str, tuple[int, list[int]]]] = {}
        self.requests = 0

    async def start(self) -> None:
        """Open the port and start answering."""
        devices = [self._device(slave) for slave in self.slaves.values()]
        if isinstance(self.port, TcpEndpoint):
            self._server = ModbusTcpServer(
                devices,
                framer=FramerType.SOCKET if self.framing == "tcp" else FramerType.RTU,
                address=(self.port.host, self.port.port),
                trace_pdu=self._filter,  # type: ignore[arg-type]  # None drops the request
            )
        else:
            self._server = ModbusSerialServer(
                devices,
                port=self.port,
                baudrate=self._baudrate,
                trace_pdu=self._filter,  # type: ignore[arg-type]  # None drops the request
            )
        try:
            await self._server.serve_forever(background=True)
        except RuntimeError as exc:
            # pymodbus says only "Could not start listen"; binding again gives the reason (in use, not allowed).
            self._server = None
            raise BusUnavailable(f"simulator: cannot listen on {self.port}: {_bind_error(self.port)}") from exc
        runtime = self._server.context.devices  # type: ignore[union-attr]
        for unit in self.slaves:
            self._blocks[unit] = {
                t: (runtime[unit].block[b][0], runtime[unit].block[b][2]) for t, b in _BLOCK_ID.items()
            }
        for slave in self.slaves.values():
            for point in slave.points:
                self._store(slave.unit, point, point.wave.at(time.time(), point.seed))

    async def stop(self) -> None:
        """Stop answering and close the port."""
        if self._server:
            await self._server.shutdown()  # type: ignore[no-untyped-call]  # pymodbus leaves it untyped
            self._server = None

    def _device(self, slave: SimSlave) -> SimDevice:
        ends = {t: 0 for t in _BLOCK_ID}
        for p in slave.points:
            ends[p.table] = max(ends[p.table], p.address + p.codec.count)

        def bits(table: str) -> list[SimData]:
            return [SimData(0, count=ends[table] + _SLACK * 16, values=False, datatype=DataType.BITS)]

        def regs(table: str) -> list[SimData]:
            return [SimData(0, count=ends[table] + _SLACK, values=0, datatype=DataType.REGISTERS)]

        async def action(fc: int, _start: int, address: int, count: int, _regs: list[int], values: object) -> None:
            self._on_request(slave, fc, address, count, values is not None)

        return SimDevice(
            id=slave.unit,
            simdata=(bits("coil"), bits("discrete"), regs("holding"), regs("input")),
            action=action,
        )

    def _filter(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU | None:
        # A dead or absent unit stays silent, as on a real bus (pymodbus would answer exception 4).
        if not sending:
            slave = self.slaves.get(pdu.dev_id)
            if slave is None or slave.dead:
                return None
            self.requests += 1
        return pdu

    def _on_request(self, slave: SimSlave, fc: int, address: int, count: int, write: bool) -> None:
        table = _TABLE_OF_FC.get(fc)
        if table is None:
            return
        # For bit tables pymodbus passes the count in 16-bit words.
        end = address + (count * 16 if table in BIT_TABLES else count)
        now = time.time()
        for point in slave.points:
            if point.table != table or point.address >= end or point.address + point.codec.count <= address:
                continue
            if write:
                point.held = True
            elif not point.held:
                self._store(slave.unit, point, point.wave.at(now, point.seed))

    def _store(self, unit: int, point: SimPoint, value: Value) -> None:
        start, regs = self._blocks[unit][point.table]
        codec = point.codec
        if point.table in BIT_TABLES:
            self._set_bit(start, regs, point.address, bool(value))
            return
        if codec.type == "bitfield":
            # The device holds the whole word; the gateway publishes its named bits.
            codec = PointCodec("uint16", byte_order=codec.byte_order)
            if isinstance(value, dict):
                names = {n: b for b, n in point.codec.bits}
                value = sum(1 << names[n] for n, on in value.items() if on and n in names)
        if codec.type == "string" and not isinstance(value, str):
            value = "" if value in (0, None) else str(value)
        try:
            words = codec.encode(value)
        except ValueError as exc:
            log.warning("simulated point %s cannot hold %r: %s", point.name, value, exc)
            return
        offset = point.address - start
        regs[offset : offset + len(words)] = words

    @staticmethod
    def _set_bit(start: int, regs: list[int], address: int, value: bool) -> None:
        index, bit = address // 16 - start, address % 16
        regs[index] = (regs[index] | (1 << bit)) if value else (regs[index] & ~(1 << bit))

    def _point(self, unit: int, name: str) -> SimPoint:
        for point in self.slaves[unit].points:
            if point.name == name:
                return point
        raise KeyError(f"unit {unit} has no simulated point {name!r}")

    def set(self, unit: int, name: str, value: Value) -> None:
        """Make a point hold `value` (in engineering units) from now on."""
        point = self._point(unit, name)
        point.held = True
        self._store(unit, point, value)

    def get(self, unit: int, name: str) -> Decoded:
        """The value a point holds now, decoded with its codec."""
        point = self._point(unit, name)
        start, regs = self._blocks[unit][point.table]
        if point.table in BIT_TABLES:
            index, bit = point.address // 16 - start, point.address % 16
            return bool(regs[index] >> bit & 1)
        offset = point.address - start
        return point.codec.decode(regs[offset : offset + point.codec.count])

    def set_dead(self, unit: int, dead: bool = True) -> None:
        """Make a unit stop (or resume) answering."""
        self.slaves[unit].dead = dead
