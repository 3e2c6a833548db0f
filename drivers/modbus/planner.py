"""Block planner: turn a device's points into the fewest Modbus read requests."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

TABLES: tuple[str, ...] = ("coil", "discrete", "input", "holding")
BIT_TABLES: frozenset[str] = frozenset({"coil", "discrete"})
MAX_REGISTERS = 125  # per read request (FC3/FC4), Modbus application protocol 6.3/6.4
MAX_BITS = 2000  # per read request (FC1/FC2), Modbus application protocol 6.1/6.2
ADDRESS_SPACE = 65536
#: The read functions (1-4) and the table each reads.
READ_TABLES: dict[int, str] = {1: "coil", 2: "discrete", 3: "holding", 4: "input"}


@dataclass(frozen=True, slots=True)
class Span:
    """The registers (or bits) one point occupies in one Modbus table."""

    key: str
    table: str
    address: int
    count: int

    def __post_init__(self) -> None:
        if self.table not in TABLES:
            raise ValueError(f"point {self.key!r}: unknown table {self.table!r}, expected one of {TABLES}")
        if not 0 <= self.address < ADDRESS_SPACE:
            raise ValueError(f"point {self.key!r}: address {self.address} outside 0..{ADDRESS_SPACE - 1}")
        if self.count < 1:
            raise ValueError(f"point {self.key!r}: count must be >= 1, got {self.count}")
        if self.address + self.count > ADDRESS_SPACE:
            raise ValueError(
                f"point {self.key!r}: {self.count} from address {self.address} "
                f"runs past the end of the {self.table} table ({ADDRESS_SPACE - 1})"
            )

    @property
    def end(self) -> int:
        """First address after the point."""
        return self.address + self.count


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One read request and the points whose values it carries."""

    table: str
    address: int
    count: int
    spans: tuple[Span, ...]


def table_limit(table: str, max_registers: int = MAX_REGISTERS) -> int:
    """Largest count one read request may carry on `table`."""
    if table in BIT_TABLES:
        return MAX_BITS
    return min(MAX_REGISTERS, max_registers)


def plan(spans: Iterable[Span], *, max_gap: int = 10, max_registers: int = MAX_REGISTERS) -> list[ReadRequest]:
    """Group points into the minimal number of read requests, by table then address."""
    if max_gap < 0:
        raise ValueError(f"max_gap must be >= 0, got {max_gap}")
    if max_registers < 1:
        raise ValueError(f"max_registers must be >= 1, got {max_registers}")

    by_table: dict[str, list[Span]] = {table: [] for table in TABLES}
    for span in spans:
        by_table[span.table].append(span)

    requests: list[ReadRequest] = []
    for table in TABLES:
        limit = table_limit(table, max_registers)
        for span in by_table[table]:
            if span.count > limit:
                raise ValueError(
                    f"point {span.key!r} needs {span.count} {_unit(table)} on the {table} "
                    f"table, more than one read request can carry ({limit})"
                )
        requests.extend(_sweep(table, by_table[table], max_gap, limit))
    return requests


def _sweep(table: str, spans: list[Span], max_gap: int, limit: int) -> list[ReadRequest]:
    """Greedy sweep by start address over one table's points.

    Minimal: each request's end is beyond every earlier point's end, so the point that
    opens request j either ends more than `limit` past the start of every earlier
    request, or starts more than `max_gap` after every earlier point has ended. Hence no
    two opening points fit in one request, and any plan needs as many requests as this
    one makes. tests/drivers/modbus/test_planner.py checks this against brute force.
    """
    # Full key makes the order (and so the output) independent of input order.
    ordered = sorted(spans, key=lambda s: (s.address, s.end, s.key))
    requests: list[ReadRequest] = []
    group: list[Span] = []
    start = end = 0
    for span in ordered:
        if group and span.address <= end + max_gap and max(end, span.end) - start <= limit:
            group.append(span)
            end = max(end, span.end)
            continue
        if group:
            requests.append(ReadRequest(table, start, end - start, tuple(group)))
        group, start, end = [span], span.address, span.end
    if group:
        requests.append(ReadRequest(table, start, end - start, tuple(group)))
    return requests


def _unit(table: str) -> str:
    return "bits" if table in BIT_TABLES else "registers"
