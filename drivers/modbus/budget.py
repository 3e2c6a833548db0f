"""Wire-time budget of a Modbus RTU RS-485 line: frame sizes, timings, utilisation (none on a Modbus TCP line)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from drivers.modbus.planner import BIT_TABLES, MAX_BITS, MAX_REGISTERS, TABLES, ReadRequest
from drivers.modbus.settings import LineSettings

OVERLOAD_THRESHOLD = 0.8  # callers warn above this: retries and jitter need headroom
FAST_BAUD = 19200  # above this the spec fixes t3.5 instead of scaling it
T35_FAST = 0.00175  # seconds; Modbus over serial line V1.02, 2.5.1.1
MAX_WRITE_COILS = 1968  # FC15, Modbus application protocol 6.11
MAX_WRITE_REGISTERS = 123  # FC16, Modbus application protocol 6.12
WRITABLE_TABLES: frozenset[str] = frozenset({"coil", "holding"})
#: A LineBudget's `framing` on a Modbus TCP line, which has no wire time to budget.
MBAP_FRAMING = "Modbus TCP"

# Every RTU frame carries unit id + function code up front and a 2-byte CRC at the end.
_ENVELOPE = 1 + 1 + 2


def char_bits(bytesize: int = 8, parity: str = "E", stopbits: float = 1) -> int:
    """Bits one character takes on the wire: start + data + parity + stop."""
    if bytesize not in (5, 6, 7, 8):
        raise ValueError(f"bytesize must be 5..8, got {bytesize}")
    if parity not in ("N", "E", "O", "M", "S"):
        raise ValueError(f"parity must be one of N, E, O, M, S, got {parity!r}")
    if stopbits not in (1, 1.5, 2):
        raise ValueError(f"stopbits must be 1, 1.5 or 2, got {stopbits}")
    # 1.5 stop bits rounds up: a budget should err towards a busier line.
    return 1 + bytesize + (0 if parity == "N" else 1) + math.ceil(stopbits)


def t35(baudrate: int, bits_per_char: int) -> float:
    """Seconds of the 3.5-character silence that delimits RTU frames."""
    _check_line(baudrate, bits_per_char)
    if baudrate > FAST_BAUD:
        return T35_FAST
    return 3.5 * bits_per_char / baudrate


def read_request_bytes() -> int:
    """Bytes of an RTU read request (FC1-FC4): envelope + address + quantity."""
    return _ENVELOPE + 2 + 2


def read_response_bytes(table: str, count: int) -> int:
    """Bytes of an RTU read response carrying `count` registers or bits."""
    _check_count(table, count, MAX_BITS if table in BIT_TABLES else MAX_REGISTERS, "read")
    return _ENVELOPE + 1 + _data_bytes(table, count)


def write_request_bytes(table: str, count: int) -> int:
    """Bytes of an RTU write request: FC5/FC6 for one value, FC15/FC16 for several."""
    _check_writable(table, count)
    if count == 1:
        return _ENVELOPE + 2 + 2
    return _ENVELOPE + 2 + 2 + 1 + _data_bytes(table, count)


def write_response_bytes(table: str, count: int) -> int:
    """Bytes of an RTU write response: FC5/6 echo and FC15/16 reply are both 8."""
    _check_writable(table, count)
    return _ENVELOPE + 2 + 2


def transaction_bytes(table: str, count: int, *, write: bool = False) -> tuple[int, int]:
    """(request bytes, response bytes) of one RTU read or write of `count` registers or bits."""
    if write:
        return write_request_bytes(table, count), write_response_bytes(table, count)
    return read_request_bytes(), read_response_bytes(table, count)


def wire_time(nbytes: int, baudrate: int, bits_per_char: int) -> float:
    """Seconds `nbytes` characters take on the wire, without inter-frame silence."""
    _check_line(baudrate, bits_per_char)
    return nbytes * bits_per_char / baudrate


def transaction_time(request_bytes: int, response_bytes: int, baudrate: int, bits_per_char: int) -> float:
    """Seconds one request/response pair holds the line, one t3.5 gap per frame."""
    return wire_time(request_bytes + response_bytes, baudrate, bits_per_char) + 2 * t35(baudrate, bits_per_char)


def response_timeout(
    response_bytes: int,
    baudrate: int,
    bits_per_char: int,
    margin: float = 0.1,
    *,
    request_bytes: int | None = None,
) -> float:
    """Default response timeout: response and request wire time + t3.5 + margin."""
    # The clock starts when the request is handed to the port, not when it has drained,
    # so its wire time counts too; a write passes its own (larger) request size.
    if request_bytes is None:
        request_bytes = read_request_bytes()
    return wire_time(response_bytes + request_bytes, baudrate, bits_per_char) + t35(baudrate, bits_per_char) + margin


@dataclass(frozen=True, slots=True)
class LineBudget:
    """How much of one RS-485 line its polling jobs need."""

    busy_per_second: float
    utilisation: float
    cycle_seconds: tuple[float, ...]
    intervals: tuple[float, ...]
    transactions: int
    baudrate: int
    bits_per_char: int
    framing: str = ""

    @property
    def overloaded(self) -> bool:
        """Whether the line is busier than callers should accept quietly."""
        return self.utilisation > OVERLOAD_THRESHOLD

    def describe(self) -> str:
        """One human line with the numbers behind the utilisation."""
        if self.framing == MBAP_FRAMING:
            return f"needs no serial wire time: Modbus TCP ({self.transactions} transactions per round)"
        framing = f"{self.framing} " if self.framing else ""
        line = f"{self.baudrate} baud {framing}({self.bits_per_char} bits/char)"
        if not self.intervals:
            return f"needs 0% of the line: no polling jobs at {line}"
        # Scale to the slowest poll interval so the two figures read as one period.
        window = max(self.intervals)
        jobs = "job" if len(self.intervals) == 1 else "jobs"
        return (
            f"needs {self.utilisation:.0%} of the line: {self.busy_per_second * window:.2f} s "
            f"of wire time per {window:.2f} s ({len(self.intervals)} {jobs}, "
            f"{self.transactions} transactions per round) at {line}"
        )


def line_budget(
    jobs: Iterable[tuple[float, Sequence[tuple[int, int]]]],
    baudrate: int,
    bits_per_char: int,
    *,
    framing: str = "",
) -> LineBudget:
    """Wire time per second that polling jobs, given as (interval, transactions), need."""
    cycles: list[float] = []
    intervals: list[float] = []
    transactions = 0
    for interval, pairs in jobs:
        if not interval > 0:
            raise ValueError(f"poll interval must be > 0 s, got {interval}")
        cycles.append(sum(transaction_time(req, resp, baudrate, bits_per_char) for req, resp in pairs))
        intervals.append(interval)
        transactions += len(pairs)
    busy = sum(cycle / interval for cycle, interval in zip(cycles, intervals, strict=True))
    return LineBudget(
        busy_per_second=busy,
        utilisation=busy,
        cycle_seconds=tuple(cycles),
        intervals=tuple(intervals),
        transactions=transactions,
        baudrate=baudrate,
        bits_per_char=bits_per_char,
        framing=framing,
    )


def plan_budget(line: LineSettings, plans: Iterable[tuple[float, Iterable[ReadRequest]]]) -> LineBudget:
    """The share of `line` that one cycle of each poll plan, given as (interval, planned reads), needs.

    A Modbus TCP line has no serial wire and no baud rate: its plan needs none of a wire's time.
    """
    bits = char_bits(line.bytesize, line.parity, line.stopbits)
    if line.mbap:
        listed = [(interval, list(reads)) for interval, reads in plans]
        if any(not interval > 0 for interval, _ in listed):
            raise ValueError("poll interval must be > 0 s")
        return LineBudget(
            busy_per_second=0.0,
            utilisation=0.0,
            cycle_seconds=tuple(0.0 for _ in listed),
            intervals=tuple(interval for interval, _ in listed),
            transactions=sum(len(reads) for _, reads in listed),
            baudrate=line.baudrate,
            bits_per_char=bits,
            framing=MBAP_FRAMING,
        )
    jobs = [(interval, [transaction_bytes(r.table, r.count) for r in reads]) for interval, reads in plans]
    return line_budget(jobs, line.baudrate, bits, framing=f"{line.bytesize}{line.parity}{line.stopbits}")


def _data_bytes(table: str, count: int) -> int:
    # Bits pack eight to a byte, low bit first; registers are two bytes each.
    return math.ceil(count / 8) if table in BIT_TABLES else 2 * count


def _check_line(baudrate: int, bits_per_char: int) -> None:
    if baudrate <= 0:
        raise ValueError(f"baudrate must be > 0, got {baudrate}")
    if bits_per_char <= 0:
        raise ValueError(f"bits_per_char must be > 0, got {bits_per_char}")


def _check_count(table: str, count: int, limit: int, action: str) -> None:
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}, expected one of {TABLES}")
    if not 1 <= count <= limit:
        raise ValueError(f"cannot {action} {count} from the {table} table in one request (1..{limit})")


def _check_writable(table: str, count: int) -> None:
    if table not in WRITABLE_TABLES:
        raise ValueError(f"the {table} table is read-only; only coil and holding can be written")
    _check_count(table, count, MAX_WRITE_COILS if table == "coil" else MAX_WRITE_REGISTERS, "write")
