"""The Modbus TCP server's test rig: a line on a real pty with pymodbus slaves behind it, the server in front."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from pymodbus.framer import FramerSocket
from pymodbus.pdu import DecodePDU, ModbusPDU

from drivers.modbus.bus import ModbusBus
from drivers.modbus.server import ModbusTcpServer
from drivers.modbus.settings import ExposeSettings, LineSettings, ServerSettings
from drivers.sim.line import VirtualLine
from drivers.sim.modbus import ModbusSimulator, SimPoint, SimSlave
from gateway.config.settings import modbus_line
from hil import scenarios
from hil.ports import free_port

from configs import Section
from helpers import Recorder


def line_config(devices: str | list[Section], **bus: object) -> LineSettings:
    """A bus config validated like a user's, at 115200 baud without parity (ptys refuse even parity)."""
    return modbus_line(scenarios.bus_config(devices, **{"baudrate": 115200, "parity": "N", **bus}))


@dataclass
class StubGate:
    """A WriteGate that admits while it has tokens and notes every call."""

    tokens: int = 1000
    admitted: list[tuple[str, str, str]] = field(default_factory=list)
    records: list[tuple[str, str, str, bool, str | None]] = field(default_factory=list)

    def admit(self, device: str, origin: str, what: str) -> str | None:
        """A refusal once the tokens are spent."""
        self.admitted.append((device, origin, what))
        if self.tokens <= 0:
            return f"rate limited: {device}"
        self.tokens -= 1
        return None

    def record(self, device: str, origin: str, what: str, ok: bool, error: str | None) -> None:
        """Noted."""
        self.records.append((device, origin, what, ok, error))


@dataclass
class ServerRig:
    """A line with simulated slaves, and the server exposing its devices."""

    bus: ModbusBus
    sim: ModbusSimulator
    server: ModbusTcpServer
    gate: StubGate
    rec: Recorder

    @property
    def port(self) -> int:
        """The server's port."""
        return self.server.port

    def line_transactions(self) -> int:
        """Every transaction the line carried out: its polls, writes and pass-throughs."""
        return self.bus.stats.transactions + self.bus.stats.passthrough


@asynccontextmanager
async def server_rig(
    tmp_path: Path,
    cfg: LineSettings,
    expose: Sequence[ExposeSettings],
    *,
    dead: tuple[int, ...] = (),
    gate: StubGate | None = None,
    **server: object,
) -> AsyncIterator[ServerRig]:
    """The line, its slaves and the server, started; everything stopped at the end."""
    line = VirtualLine(tmp_path / "tty-server")
    line.start()
    slaves = [
        SimSlave(d.unit, [SimPoint(p.name, p.table, p.address, p.codec) for p in d.points], dead=d.unit in dead)
        for d in cfg.devices
    ]
    sim = ModbusSimulator(line.device_port, slaves)
    rec = Recorder()
    bus = ModbusBus(replace(cfg, port=line.gateway_port), rec.sample, rec.state)
    port = free_port()
    settings = ServerSettings(
        listen=f"127.0.0.1:{port}",
        host="127.0.0.1",
        port=port,
        expose=tuple(expose),
        **server,  # type: ignore[arg-type]
    )
    gate = gate or StubGate()
    srv = ModbusTcpServer(settings, [bus], gate)
    await sim.start()
    await bus.start()
    await srv.start()
    try:
        yield ServerRig(bus, sim, srv, gate, rec)
    finally:
        await srv.stop()
        await bus.stop()
        await sim.stop()
        line.close()


class RawClient:
    """A Modbus TCP client on a plain socket: frames built and read by pymodbus' socket framer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.framer = FramerSocket(DecodePDU(is_server=False))

    @classmethod
    async def connect(cls, port: int, *, buffers: int | None = None) -> RawClient:
        """Connected to the server on loopback; `buffers`: the socket's send and receive buffers, in bytes."""
        if buffers is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            return cls(reader, writer)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    def frame(self, request: ModbusPDU, tid: int, unit: int) -> bytes:
        """The request's MBAP frame."""
        return self.frame_of(request, tid, unit)

    @staticmethod
    def frame_of(request: ModbusPDU, tid: int, unit: int) -> bytes:
        """The request's MBAP frame, built by pymodbus' socket framer."""
        request.transaction_id, request.dev_id = tid, unit
        return FramerSocket(DecodePDU(is_server=False)).buildFrame(request)

    async def send(self, data: bytes) -> None:
        """Bytes to the server as given."""
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, timeout: float = 20.0) -> ModbusPDU:
        """The next response frame, decoded."""
        async with asyncio.timeout(timeout):
            header = await self.reader.readexactly(6)
            (length,) = struct.unpack(">H", header[4:6])
            rest = await self.reader.readexactly(length)
        used, pdu = self.framer.handleFrame(header + rest, 0, 0)
        assert used == 6 + length and pdu is not None, (header + rest).hex()
        return pdu

    async def closed(self, timeout: float = 20.0) -> bool:
        """True when the server closes the connection (after any bytes it still sends)."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    chunk = await self.reader.read(4096)
                except ConnectionError:
                    return True
                if not chunk:
                    return True

    def close(self) -> None:
        """Gone."""
        self.writer.close()
