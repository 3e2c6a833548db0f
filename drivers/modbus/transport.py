"""The pymodbus boundary: one client per line, its three failure shapes mapped to our errors."""

from __future__ import annotations

import errno
import logging
import socket
import struct
import sys
import termios
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from drivers.modbus import rs485
from drivers.modbus.settings import Rs485Settings, TcpEndpoint
from gateway.errors import BusUnavailable, CrcError, DeviceException, DeviceTimeout, PortBusy, ProtocolError

# pymodbus logs every timeout at ERROR with a frame dump; we log state changes ourselves.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

_EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    5: "acknowledge",
    6: "device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}


#: Exception codes a Modbus gateway (a TCP-to-RTU converter) sends for a unit behind it that it cannot reach:
#: 10 gateway path unavailable, 11 gateway target failed to respond.
GATEWAY_EXCEPTIONS = frozenset({10, 11})
#: Timeouts in a row after which pymodbus would close a TCP connection: in effect never (see ModbusLink).
NEVER_DISCONNECT = sys.maxsize
#: Bytes received and not yet framed that a Modbus TCP link keeps: 16 of the largest frames (an MBAP header and a
#: 253-byte PDU), so that late answers queued behind each other never crowd out the awaited one, while a peer
#: that sends without end is still dropped at a few kilobytes.
MBAP_RECEIVE_BUFFER = 16 * (7 + 253)
#: TCP finds a Modbus TCP peer gone (powered off, unplugged, a network down) that never closed the connection:
#: keepalive probes on an idle connection, and a limit on how long sent data may stay unacknowledged.
KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
UNACKED_LIMIT_MS = 20_000


class ModbusLink:
    """A Modbus client on one serial line, Modbus TCP endpoint or RTU-over-TCP serial device server."""

    def __init__(
        self,
        port: str | TcpEndpoint,
        *,
        framing: str = "rtu",
        baudrate: int = 9600,
        parity: str = "E",
        bytesize: int = 8,
        stopbits: int = 1,
        connect_timeout: float = 3.0,
        rs485: Rs485Settings | None = None,
    ) -> None:
        self.port = port
        self._rs485 = rs485
        self._connect_timeout = connect_timeout
        #: Modbus TCP (MBAP): answers carry the request's transaction id, a connection has its own health.
        self.mbap = isinstance(port, TcpEndpoint) and framing == "tcp"
        # Whether bytes came in during the current transaction: pymodbus drops a frame with a bad
        # CRC without a word, so a timeout after bytes arrived is the only sign of a garbled answer.
        self._rx_seen = False
        self._undecodable = False  # the current transaction's answer was a frame pymodbus cannot decode
        #: time.monotonic() when bytes last came in (0.0 before any): the line has been quiet since.
        self.last_rx = 0.0
        client: AsyncModbusSerialClient | AsyncModbusTcpClient
        if isinstance(port, TcpEndpoint):
            client = AsyncModbusTcpClient(
                port.host,
                port=port.port,
                framer=FramerType.SOCKET if framing == "tcp" else FramerType.RTU,
                timeout=connect_timeout,
                retries=0,
                reconnect_delay=0,
                trace_packet=self._heard,
                trace_connect=self._connection_changed,
            )
            # pymodbus closes a TCP connection after a few timeouts in a row. Behind a Modbus TCP-to-RTU
            # converter or a serial device server that is one dead unit among live ones, and reconnecting
            # cannot revive it: the line's schedule takes a silent unit offline and probes it, TCP itself
            # finds a dead peer.
            client.set_max_no_responses(NEVER_DISCONNECT)
            if self.mbap:
                # pymodbus drops its whole receive buffer once it holds more than one frame: a late answer
                # that arrives together with the awaited one would take that one with it.
                client.ctx.max_buffer_size = MBAP_RECEIVE_BUFFER
                client.ctx.callback_data = self._undecodable_dropped(client.ctx.callback_data)  # type: ignore[method-assign]
        else:
            client = AsyncModbusSerialClient(
                port,
                baudrate=baudrate,
                parity=parity,
                bytesize=bytesize,
                stopbits=stopbits,
                timeout=connect_timeout,
                retries=0,
                reconnect_delay=0,
                trace_packet=self._heard,
            )
        self._client = client

    @property
    def connected(self) -> bool:
        """True while the port is open."""
        return bool(self._client.connected)

    async def open(self) -> None:
        """Open the port; PortBusy when another process holds it, BusUnavailable when it cannot be opened otherwise."""
        if self.connected:
            return
        # pymodbus keeps one timeout for connecting and for responses, and each request sets it to its own.
        self._client.ctx.comm_params.timeout_connect = self._connect_timeout
        # pymodbus turns a failed open into `False` and drops the reason; its port factory is wrapped to keep it,
        # since "busy", "missing" and "no permission" each need a different fix from the user.
        ctx = self._client.ctx
        create = ctx.call_create
        refused: list[OSError] = []

        async def create_keeping_the_reason() -> Any:
            try:
                return await create()
            except OSError as exc:
                refused.append(exc)
                raise

        ctx.call_create = create_keeping_the_reason
        try:
            ok = await self._client.connect()
        except termios.error as exc:
            # pyserial opened the port and closed it again: the port refuses the line's baud rate or framing
            # (a pseudo-terminal refuses even parity). Not an OSError, so pymodbus lets it through.
            p = ctx.comm_params
            line = f"{p.baudrate} baud {p.bytesize}{p.parity}{p.stopbits}"
            raise BusUnavailable(f"cannot open {self.port}: it refuses {line} ({exc.args[-1]})") from exc
        except (OSError, ModbusException, ValueError) as exc:  # ValueError: pyserial refusing a setting
            raise BusUnavailable(f"cannot open {self.port}: {exc}") from exc
        finally:
            ctx.call_create = create
        if not ok:
            why = refused[0] if refused else None
            if why is not None and isinstance(why.__context__, OSError):
                why = why.__context__  # pyserial's error wraps the OS's, which has the plain errno and reason
            code = why.errno if why is not None else None
            serial_port = not isinstance(self.port, TcpEndpoint)
            if serial_port and code in (errno.EAGAIN, errno.EBUSY):
                # EAGAIN: another process holds the exclusive lock (flock) pymodbus has pyserial take;
                # EBUSY: another program set TIOCEXCL on the port.
                raise PortBusy(f"port busy: {self.port} is in use by another process")
            reason = f": {why.strerror or why}" if why is not None else ""
            if serial_port and code == errno.EACCES:
                reason += " (is the gateway's user in the `dialout` group?)"
            raise BusUnavailable(f"cannot open {self.port}{reason}")
        if self._rs485 is not None:
            try:
                rs485.configure(self._client, self._rs485)
            except BusUnavailable:
                self._client.close()
                raise
        if isinstance(self.port, TcpEndpoint):
            _watch_peer(self._client.ctx.transport)

    def close(self) -> None:
        """Close the port."""
        self._client.close()

    async def read(self, table: str, unit: int, address: int, count: int, timeout: float) -> list[int] | list[bool]:
        """One read transaction: registers for register tables, bools for bit tables."""
        c = self._client
        call = {
            "holding": c.read_holding_registers,
            "input": c.read_input_registers,
            "coil": c.read_coils,
            "discrete": c.read_discrete_inputs,
        }[table]
        response = await self._execute(partial(call, address, count=count, device_id=unit), unit, timeout)
        if table in ("coil", "discrete"):
            return list(response.bits[:count])
        if len(response.registers) != count:
            raise ProtocolError(f"unit {unit}: asked for {count} registers, got {len(response.registers)}")
        return list(response.registers)

    async def write(
        self, table: str, unit: int, address: int, values: Sequence[int] | Sequence[bool], timeout: float
    ) -> None:
        """One write transaction, single or multiple as the value count requires."""
        c = self._client
        op: Callable[[], Awaitable[ModbusPDU]]
        if table == "coil":
            bits = [bool(v) for v in values]
            op = partial(c.write_coil, address, bits[0]) if len(bits) == 1 else partial(c.write_coils, address, bits)
        elif table == "holding":
            regs = [int(v) for v in values]
            op = (
                partial(c.write_register, address, regs[0])
                if len(regs) == 1
                else partial(c.write_registers, address, regs)
            )
        else:
            raise ProtocolError(f"the {table} table cannot be written")
        op = partial(op, device_id=unit)
        await self._execute(op, unit, timeout)

    async def execute(self, request: ModbusPDU, unit: int, timeout: float) -> ModbusPDU:
        """Carry out any request pymodbus can frame (a pass-through); the device's exception response is returned."""
        request.dev_id = unit
        return await self._execute(partial(self._client.execute, False, request), unit, timeout, errors=False)

    def _undecodable_dropped(self, take: Callable[[bytes, tuple[str, int] | None], int]) -> Callable[..., int]:
        def take_or_drop(data: bytes, addr: tuple[str, int] | None = None) -> int:
            try:
                return take(data, addr)
            except ModbusIOException:
                # A frame whose PDU pymodbus cannot decode (a function it does not know): raised out of asyncio's
                # data_received, it would log a traceback and close the connection. Dropped instead, the request
                # fails as for any unusable answer and the connection stays for the other units.
                self._undecodable = True
                return len(data)

        return take_or_drop

    def _connection_changed(self, connected: bool) -> None:
        # pymodbus leaves a request waiting for its whole timeout when the peer closes the connection
        # under it: fail it now, as the line being lost, not as the device being silent.
        if connected:
            return
        waiting = self._client.ctx.response_future
        if not waiting.done():
            waiting.set_exception(ConnectionException(f"{self.port}: connection closed by the peer"))

    def _heard(self, sending: bool, data: bytes) -> bytes:
        if not sending and data:
            self._rx_seen = True
            self.last_rx = time.monotonic()
        return data

    async def _execute(
        self, op: Callable[[], Awaitable[ModbusPDU]], unit: int, timeout: float, *, errors: bool = True
    ) -> ModbusPDU:
        # pymodbus reads its response timeout from these params at each request.
        self._client.ctx.comm_params.timeout_connect = timeout
        self._rx_seen = self._undecodable = False
        try:
            # Called in here: on a port that was lost, pymodbus raises "Not connected" at the call itself.
            response: ModbusPDU = await op()
        except ConnectionException as exc:
            raise BusUnavailable(f"{self.port}: {exc}") from exc
        except ModbusIOException as exc:
            if "device id" in str(exc):
                raise ProtocolError(f"unit {unit}: answer from another unit ({exc})") from exc
            if self.mbap and self._client.ctx.recv_buffer:
                # Part of a frame came and its rest did not: the rest may still come, in front of the next
                # answer, and a TCP stream has no silence to find a frame's start by. A new connection is in step.
                self._client.close()
                cut = "its answer was cut short: reconnecting"
                raise DeviceTimeout(f"unit {unit}: no response within {timeout * 1000:.0f} ms ({cut})") from exc
            if self.mbap and self._rx_seen:
                # MBAP frames cannot be garbled on TCP: what came was another request's (late) answer, or one
                # pymodbus cannot decode.
                late = "an undecodable answer" if self._undecodable else "an answer to an earlier request"
                late += " was dropped"
                raise DeviceTimeout(f"unit {unit}: no response within {timeout * 1000:.0f} ms ({late})") from exc
            if self._rx_seen:
                raise CrcError(f"unit {unit}: garbled response (no frame with a valid CRC)") from exc
            raise DeviceTimeout(f"unit {unit}: no response within {timeout * 1000:.0f} ms") from exc
        except (ModbusException, ValueError, struct.error) as exc:
            # struct.error: a request pymodbus decoded from a client but cannot encode again (a diagnostics
            # sub-function with extra data, a file record past 255 bytes); it must fail its request, not the line.
            raise ProtocolError(f"unit {unit}: {exc}") from exc
        except OSError as exc:
            raise BusUnavailable(f"{self.port}: {exc}") from exc
        if errors and response.isError():
            code = int(getattr(response, "exception_code", 0))
            name = _EXCEPTION_NAMES.get(code, "unknown exception")
            if self.mbap and code in GATEWAY_EXCEPTIONS:
                # A Modbus TCP gateway answering for a unit it cannot reach: the unit itself is silent.
                raise DeviceTimeout(f"unit {unit}: no response (the gateway answered exception {code}, {name})")
            raise DeviceException(f"unit {unit}: exception {code} ({name})", code)
        return response


def _watch_peer(transport: object) -> None:
    """Have TCP itself close a Modbus TCP connection whose peer went away without a word."""
    sock = getattr(transport, "get_extra_info", lambda _name: None)("socket")
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        ("TCP_USER_TIMEOUT", UNACKED_LIMIT_MS),
    ):
        option = getattr(socket, name, None)  # Linux names; elsewhere the system's defaults apply
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
