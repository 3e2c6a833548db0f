"""What the Modbus TCP server answers to one decoded request: a cache hit, a pass-through on the device's line,
a write through the gate, or an exception (0x01, 0x03, 0x06, 0x0A, 0x0B). pymodbus decodes and encodes every PDU.

Pure of sockets: the connection (server_conn.py) frames requests and answers; this module decides.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import (
    ReadCoilsResponse,
    ReadDiscreteInputsResponse,
    WriteMultipleCoilsRequest,
    WriteSingleCoilRequest,
)
from pymodbus.pdu.mei_message import ReadDeviceInformationResponse
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersResponse,
    ReadInputRegistersResponse,
    ReadWriteMultipleRegistersRequest,
    WriteMultipleRegistersRequest,
    WriteSingleRegisterRequest,
)

from drivers.modbus.device import Device
from drivers.modbus.planner import READ_TABLES as READ_TABLES  # the read functions a poll cache can answer
from drivers.modbus.settings import ExposeSettings
from drivers.modbus.writes import WRITE_FUNCTIONS as WRITE_FUNCTIONS  # what every device with `writes: true` takes
from gateway.errors import DeviceError, DeviceException, FieldgateError

log = logging.getLogger(__name__)

ILLEGAL_FUNCTION = 0x01
ILLEGAL_DATA_VALUE = 0x03
DEVICE_FAILURE = 0x04
BUSY = 0x06
PATH_UNAVAILABLE = 0x0A
TARGET_FAILED = 0x0B

#: Other functions that change what a device holds: write file record, mask write, read/write registers.
OTHER_WRITE_FUNCTIONS = frozenset({0x15, 0x16, 0x17})
DIAGNOSTICS = 0x08
#: Diagnostics sub-functions that change the device's state: restart communications, change the ASCII
#: delimiter, force listen-only mode (the device would stop answering the line's polls), clear counters.
DIAGNOSTICS_THAT_WRITE = frozenset({0x01, 0x03, 0x04, 0x0A, 0x14})
#: The largest counts the Modbus specification allows in one write (pymodbus decodes up to 2000 coils).
MAX_WRITE_REGISTERS = 123
MAX_WRITE_COILS = 1968
MAX_READWRITE_REGISTERS = 121
#: The room pymodbus' device identification response starts encoding its objects with (253 less its header).
MEI_SPACE = 253 - 6

#: Refused writes are audited, a flood of them not: a server-wide bucket of this many records, refilled at
#: this rate; the refusals beyond it are counted (`unaudited`) and named in the next record that is written.
REFUSAL_AUDIT_BURST = 20
REFUSAL_AUDIT_RATE = 1.0
#: An audit record's description of a write names this many of its values (and how many there were).
WHAT_VALUES = 16

_WRITE_NAMES = {5: "write_coil", 6: "write_register", 15: "write_coils", 16: "write_registers"}
_CACHE_RESPONSES: dict[int, type[ModbusPDU]] = {
    1: ReadCoilsResponse,
    2: ReadDiscreteInputsResponse,
    3: ReadHoldingRegistersResponse,
    4: ReadInputRegistersResponse,
}


class WriteGate(Protocol):
    """The gateway's rate limit and audit log for writes from the server's clients (the same as MQTT writes')."""

    def admit(self, device: str, origin: str, what: str) -> str | None:
        """None: go ahead (a token was spent); else the refusal (rate limited)."""
        ...

    def record(self, device: str, origin: str, what: str, ok: bool, error: str | None) -> None:
        """Write one audit record of a client's write: carried out (ok), failed or refused (error)."""
        ...


class Line(Protocol):
    """What the server needs of a Modbus line (ModbusBus): its devices, and transactions in its own schedule."""

    @property
    def name(self) -> str:
        """The line's name."""
        ...

    @property
    def devices(self) -> dict[str, Device]:
        """The line's devices by name."""
        ...

    async def pass_through(self, device: str, request: ModbusPDU, timeout: float | None = None) -> ModbusPDU:
        """The device's response to a client's request (its exception responses too); DeviceError when none."""
        ...

    async def raw_write(self, device: str, request: ModbusPDU, origin: str) -> ModbusPDU:
        """The device's response to a client's write, queued with the line's writes; DeviceError when none."""
        ...


@dataclass(frozen=True)
class Exposed:
    """One unit id the server serves: the entry that exposes it, the device and its line."""

    cfg: ExposeSettings
    device: Device
    line: Line


@dataclass
class ServerStats:
    """The server's counters (the snapshot's source)."""

    accepted: int = 0
    refused: int = 0
    malformed: int = 0
    cache_hits: int = 0
    passthrough: int = 0
    writes: int = 0
    busy: int = 0
    unaudited: int = 0
    exceptions: dict[int, int] = field(default_factory=dict)


def exposed_units(expose: Sequence[ExposeSettings], lines: Sequence[Line]) -> dict[int, Exposed]:
    """Each exposed unit id with its device and line; FieldgateError for a device no line has, or a unit twice."""
    units: dict[int, Exposed] = {}
    for entry in expose:
        line = next((ln for ln in lines if entry.device in ln.devices), None)
        if line is None:
            raise FieldgateError(f"modbus.server: unit {entry.unit} exposes {entry.device!r}, which no bus has")
        if entry.unit in units:
            raise FieldgateError(f"modbus.server: unit {entry.unit} is exposed twice")
        units[entry.unit] = Exposed(entry, line.devices[entry.device], line)
    return units


def exception(request: ModbusPDU, code: int) -> ModbusPDU:
    """The exception response `code` to `request`."""
    return ExceptionResponse(request.function_code, code)


def writes(request: ModbusPDU) -> bool:
    """Whether the request changes what the device holds (it needs `writes: true`)."""
    fc = request.function_code
    if fc in WRITE_FUNCTIONS or fc in OTHER_WRITE_FUNCTIONS:
        return True
    return fc == DIAGNOSTICS and request.sub_function_code in DIAGNOSTICS_THAT_WRITE


def inconsistent(request: ModbusPDU) -> bool:
    """A write whose counts, byte count and values disagree (pymodbus' own server answers these 0x03 too)."""
    if isinstance(request, WriteMultipleRegistersRequest):
        n = request.count
        return not 1 <= n <= MAX_WRITE_REGISTERS or request.byte_count != 2 * n or len(request.registers) != n
    if isinstance(request, WriteMultipleCoilsRequest):
        n = request.count
        return not 1 <= n <= MAX_WRITE_COILS or request.byte_count != (n + 7) // 8 or len(request.bits) != n
    if isinstance(request, ReadWriteMultipleRegistersRequest):
        n = request.write_count
        return (
            not 1 <= n <= MAX_READWRITE_REGISTERS
            or request.write_byte_count != 2 * n
            or len(request.write_registers) != n
        )
    return False


def reencodable(response: ModbusPDU) -> ModbusPDU:
    """The device's response, ready to be encoded again as it came.

    pymodbus' device identification response counts its objects up from what decoding set: encoded again
    unchanged it would announce twice the objects it carries.
    """
    if isinstance(response, ReadDeviceInformationResponse):
        response.number_of_objects = 0
        response.space_left = MEI_SPACE
    return response


def describe(request: ModbusPDU) -> str:
    """A request as an audit record names it, bounded: "write_registers 100 [1, 2]"."""
    fc = request.function_code
    if isinstance(request, WriteSingleCoilRequest):
        return f"write_coil {request.address} {bool(request.bits[0])}"
    if isinstance(request, WriteSingleRegisterRequest):
        return f"write_register {request.address} {request.registers[0]}"
    if fc in _WRITE_NAMES:
        values = list(request.bits if fc == 15 else request.registers)
        shown = ", ".join(str(int(v)) for v in values[:WHAT_VALUES])
        more = f", ... ({len(values)} values)" if len(values) > WHAT_VALUES else ""
        return f"{_WRITE_NAMES[fc]} {request.address} [{shown}{more}]"
    sub = f"/0x{request.sub_function_code:02x}" if request.sub_function_code >= 0 else ""
    return f"function 0x{fc:02x}{sub} {type(request).__name__}"


class RefusalAudit:
    """A token bucket for the audit records of refused writes: a client's flood of them cannot fill the log."""

    def __init__(self, burst: int = REFUSAL_AUDIT_BURST, rate: float = REFUSAL_AUDIT_RATE) -> None:
        self.burst, self.rate = burst, rate
        self._tokens = float(burst)
        self._at = time.monotonic()
        self.left_out = 0  # since the last record written

    def take(self) -> bool:
        """Whether a refusal may be audited now; False counts it as left out."""
        now = time.monotonic()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.left_out += 1
        return False


class RequestHandler:
    """Answers the requests of every connection: from the cache, the lines or the gate, or with an exception."""

    def __init__(self, units: dict[int, Exposed], gate: WriteGate, stats: ServerStats, *, cache_max_age: float) -> None:
        self.units = units
        self._gate = gate
        self.stats = stats
        self._cache_max_age = cache_max_age
        self._refusals = RefusalAudit()
        #: Admitted writes still on their way (their clients may have gone): stop() cancels them.
        self.writes_running: set[asyncio.Task[ModbusPDU]] = set()

    def route(self, unit: int, request: ModbusPDU, origin: str) -> ModbusPDU | Exposed:
        """The answer when it needs no line (a cache hit, a refusal), else the exposed unit whose line must serve it."""
        target = self.units.get(unit)
        if target is None:
            return exception(request, PATH_UNAVAILABLE)
        fc = request.function_code
        if fc in READ_TABLES:
            return self._cached(target, request) or target
        if writes(request):
            if not target.cfg.writes:
                self._refuse(target, origin, request, f"{target.device.name} takes no writes over Modbus TCP")
                return exception(request, ILLEGAL_FUNCTION)
            if inconsistent(request):
                return exception(request, ILLEGAL_DATA_VALUE)
        elif target.cfg.passthrough != "all":
            return exception(request, ILLEGAL_FUNCTION)
        try:
            # pymodbus decodes some requests it cannot encode again (a diagnostics sub-function with extra data,
            # a file record past 255 bytes): refused here, before they wait for the line.
            request.encode()
        except (struct.error, ValueError, ModbusException):
            return exception(request, ILLEGAL_DATA_VALUE)
        return target

    def _cached(self, target: Exposed, request: ModbusPDU) -> ModbusPDU | None:
        device = target.device
        if device.online is False:
            return None
        table = READ_TABLES[request.function_code]
        fresh_since = time.monotonic() - self._cache_max_age
        raw = device.cache.lookup(table, request.address, request.count, fresh_since)
        if raw is None:
            return None
        self.stats.cache_hits += 1
        response = _CACHE_RESPONSES[request.function_code]
        # The raw words or bits as the line read them: a client decodes exactly what the device holds.
        if table in ("coil", "discrete"):
            return response(bits=[bool(b) for b in raw])
        return response(registers=[int(w) for w in raw])

    async def on_line(self, target: Exposed, request: ModbusPDU, origin: str) -> ModbusPDU:
        """Carry out `request` on the target's line (a write through the gate) and give the device's answer."""
        fc = request.function_code
        if writes(request):
            return await self._write(target, request, origin)
        self.stats.passthrough += 1
        try:
            response = await target.line.pass_through(target.device.name, request)
        except DeviceException as exc:
            return exception(request, exc.code)
        except DeviceError:
            return exception(request, TARGET_FAILED)
        if response.function_code & 0x7F != fc:
            # Not an answer to this request: nothing a client could take as one.
            return exception(request, TARGET_FAILED)
        return reencodable(response)

    async def _write(self, target: Exposed, request: ModbusPDU, origin: str) -> ModbusPDU:
        name, what = target.device.name, describe(request)
        refusal = self._gate.admit(name, origin, what)
        if refusal is not None:
            self._refuse(target, origin, request, refusal, what=what)
            self.stats.busy += 1
            return exception(request, BUSY)
        self.stats.writes += 1
        # Admitted: carried out and audited even when its client goes away meanwhile (it may be on the wire).
        recorded: list[bool] = []
        task = asyncio.create_task(self._carry_out(target, request, origin, what, recorded))
        self.writes_running.add(task)
        task.add_done_callback(self.writes_running.discard)

        def stopped_before_it_ran(done: asyncio.Task[ModbusPDU]) -> None:
            # stop() cancels a write task that never ran: its `finally` never came, its outcome is audited here.
            if not recorded:
                self._gate.record(name, origin, what, False, "the gateway stopped before the write went out")

        task.add_done_callback(stopped_before_it_ran)
        return await asyncio.shield(task)

    async def _carry_out(
        self, target: Exposed, request: ModbusPDU, origin: str, what: str, recorded: list[bool]
    ) -> ModbusPDU:
        name = target.device.name
        error: str | None = "the gateway stopped before the device answered"
        try:
            response = await target.line.raw_write(name, request, origin)
            error = None
            if response.function_code & 0x7F != request.function_code:
                error, response = "the device's answer is not one to this write", exception(request, TARGET_FAILED)
            elif response.isError():
                error = f"exception {response.exception_code}"
        except DeviceException as exc:
            error, response = str(exc), exception(request, exc.code)
        except DeviceError as exc:
            error, response = str(exc), exception(request, TARGET_FAILED)
        finally:
            recorded.append(True)
            self._gate.record(name, origin, what, error is None, error)
        return response

    def _refuse(self, target: Exposed, origin: str, request: ModbusPDU, error: str, *, what: str = "") -> None:
        if not self._refusals.take():
            self.stats.unaudited += 1
            return
        left_out, self._refusals.left_out = self._refusals.left_out, 0
        if left_out:
            error = f"{error} ({left_out} more refused writes before this one were not audited)"
        self._gate.record(target.device.name, origin, what or describe(request), False, error)
