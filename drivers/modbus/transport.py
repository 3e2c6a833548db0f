"""The pymodbus boundary: one client per line, its three failure shapes mapped to our errors."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from drivers.modbus import rs485
from drivers.modbus.settings import Rs485Settings, TcpEndpoint
from gateway.errors import BusUnavailable, CrcError, DeviceException, DeviceTimeout, ProtocolError

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
        self.framing = framing
        self._rs485 = rs485
        # Whether bytes came in during the current transaction: pymodbus drops a frame with a bad
        # CRC without a word, so a timeout after bytes arrived is the only sign of a garbled answer.
        self._rx_seen = False
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
            )
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
        """Open the port; BusUnavailable when it cannot be opened."""
        if self.connected:
            return
        try:
            ok = await self._client.connect()
        except (OSError, ModbusException) as exc:
            raise BusUnavailable(f"cannot open {self.port}: {exc}") from exc
        if not ok:
            raise BusUnavailable(f"cannot open {self.port}")
        if self._rs485 is not None:
            try:
                rs485.configure(self._client, self._rs485)
            except BusUnavailable:
                self._client.close()
                raise

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
        self._rx_seen = False
        try:
            # Called in here: on a port that was lost, pymodbus raises "Not connected" at the call itself.
            response: ModbusPDU = await op()
        except ConnectionException as exc:
            raise BusUnavailable(f"{self.port}: {exc}") from exc
        except ModbusIOException as exc:
            if "device id" in str(exc):
                raise ProtocolError(f"unit {unit}: answer from another unit ({exc})") from exc
            if self._rx_seen:
                raise CrcError(f"unit {unit}: garbled response (no frame with a valid CRC)") from exc
            raise DeviceTimeout(f"unit {unit}: no response within {timeout * 1000:.0f} ms") from exc
        except (ModbusException, ValueError) as exc:
            raise ProtocolError(f"unit {unit}: {exc}") from exc
        except OSError as exc:
            raise BusUnavailable(f"{self.port}: {exc}") from exc
        if errors and response.isError():
            code = int(getattr(response, "exception_code", 0))
            name = _EXCEPTION_NAMES.get(code, "unknown exception")
            raise DeviceException(f"unit {unit}: exception {code} ({name})", code)
        return response
