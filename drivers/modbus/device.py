"""One Modbus device as the bus sees it: its planned reads, its decoding and its health."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from drivers.modbus import budget
from drivers.modbus.cache import RawCache
from drivers.modbus.codec import Decoded
from drivers.modbus.planner import BIT_TABLES, ReadRequest, Span, plan
from drivers.modbus.settings import DeviceSettings, LineSettings, PointSettings
from drivers.modbus.stats import DeviceStats
from gateway.errors import CodecError
from gateway.types import Value

log = logging.getLogger(__name__)

PROBE_BACKOFF_START = 1.0
#: A unit that comes back is polled again within a minute; at one probe a minute it costs the line ~0.2 %.
PROBE_BACKOFF_MAX = 60.0
#: The most of its line an offline unit's probes may take: each holds the line for a whole response
#: timeout, so with a long timeout the first probes come later than PROBE_BACKOFF_START.
PROBE_LINE_SHARE = 0.05
#: A Modbus TCP device's default response timeout: no baud rate to derive one from, and a TCP-to-RTU
#: converter's serial side behind it needs its own time (a device may set `timeout`).
MBAP_TIMEOUT = 1.0


@dataclass
class PollJob:
    """The points of one device that share a poll interval, with their planned reads."""

    device: Device
    interval: float
    requests: list[ReadRequest]
    due: float = 0.0


@dataclass
class Device:
    """Runtime state of one Modbus device on a bus."""

    cfg: DeviceSettings
    bus: LineSettings
    online: bool | None = None  # None until the first answer or the first verdict
    failures: int = 0
    backoff: float = PROBE_BACKOFF_START
    next_probe: float = 0.0
    probe_backoff_start: float = PROBE_BACKOFF_START  # the first wait once offline: see PROBE_LINE_SHARE
    jobs: list[PollJob] = field(default_factory=list)
    stats: DeviceStats = field(default_factory=DeviceStats)
    points: dict[str, PointSettings] = field(default_factory=dict)
    #: The raw values of the device's last reads (for the Modbus TCP server's cache hits).
    cache: RawCache = field(default_factory=RawCache)

    def __post_init__(self) -> None:
        self.points = {p.name: p for p in self.cfg.points}
        groups: dict[float, list[Span]] = {}
        for p in self.cfg.points:
            groups.setdefault(p.poll or self.cfg.poll, []).append(Span(p.name, p.table, p.address, p.codec.count))
        self.jobs = [
            PollJob(self, interval, plan(spans, max_gap=self.cfg.max_gap, max_registers=self.cfg.max_registers))
            for interval, spans in sorted(groups.items())
        ]
        # A probe is the first read of whichever job is due: budget for the slowest of them.
        probes = [self.timeout(job.requests[0].table, job.requests[0].count) for job in self.jobs if job.requests]
        self.probe_backoff_start = max([PROBE_BACKOFF_START, *(t / PROBE_LINE_SHARE for t in probes)])
        self.backoff = self.probe_backoff_start

    @property
    def name(self) -> str:
        """The device's name (a topic level)."""
        return self.cfg.name

    @property
    def unit(self) -> int:
        """The Modbus unit id."""
        return self.cfg.unit

    @property
    def offline_after(self) -> int:
        """Consecutive failed polls before the device is declared offline."""
        return self.cfg.offline_after or self.bus.offline_after

    @property
    def retries(self) -> int:
        """Retries of one request before it counts as failed."""
        return self.cfg.retries if self.cfg.retries is not None else self.bus.retries

    def timeout(self, table: str, count: int, *, write: bool = False) -> float:
        """Response timeout for one transaction: configured, or derived from the wire time."""
        if self.cfg.timeout is not None:
            return self.cfg.timeout
        if self.bus.timeout is not None:
            return self.bus.timeout
        if self.bus.mbap:
            return MBAP_TIMEOUT
        bits = budget.char_bits(self.bus.bytesize, self.bus.parity, self.bus.stopbits)
        req, resp = budget.transaction_bytes(table, count, write=write)
        # A serial device server adds a network round trip on top of the wire time.
        margin = 0.25 if self.bus.is_tcp else 0.1
        return budget.response_timeout(resp, self.bus.baudrate, bits, margin, request_bytes=req)

    def decode(self, request: ReadRequest, data: list[int] | list[bool]) -> dict[str, Value]:
        """Values of every point a read request carried; a point that fails to decode is left out."""
        values: dict[str, Value] = {}
        for span in request.spans:
            point = self.points[span.key]
            chunk = data[span.address - request.address : span.end - request.address]
            try:
                if request.table in BIT_TABLES:
                    values[point.name] = point.codec.decode_bits(chunk)  # type: ignore[arg-type]
                    continue
                value = point.codec.decode(chunk)
            except CodecError as exc:
                log.debug("%s.%s: %s", self.name, point.name, exc)
                continue
            value = _tidy(value, point)
            if isinstance(value, dict):
                # A bitfield publishes each named bit as its own value: <point>.<bit>.
                for bit, flag in value.items():
                    values[f"{point.name}.{bit}"] = flag
            else:
                values[point.name] = value
        return values

    def record_success(self) -> bool:
        """Count an answer; True when this brings the device (back) online."""
        self.failures = 0
        self.backoff = self.probe_backoff_start
        if self.online is not True:
            self.online = True
            return True
        return False

    def line_restored(self, now: float) -> None:
        """The line's port opened again: if offline, probe at once with the back-off started afresh."""
        if self.online is False:
            self.backoff = self.probe_backoff_start
            self.next_probe = now

    def record_failure(self, now: float, *, unreachable: bool = False) -> bool:
        """Count a failed poll; True when this takes the device offline.

        `unreachable`: nothing on the line can answer (the port cannot be opened): offline at once.
        """
        self.failures = max(self.failures + 1, self.offline_after if unreachable else 0)
        if self.online is False:
            # Already offline: this was a probe. Back off further.
            self.backoff = min(self.backoff * 2, max(PROBE_BACKOFF_MAX, self.probe_backoff_start))
            self.next_probe = now + self.backoff
            return False
        if self.failures >= self.offline_after:
            self.online = False
            self.backoff = self.probe_backoff_start
            self.next_probe = now + self.backoff
            return True
        return False


def _tidy(value: Decoded, point: PointSettings) -> Decoded:
    # Publish what the device meant, not binary noise: a float32 carries ~7 significant digits,
    # and 215 * 0.1 should read 21.5, not 21.500000000000004.
    if isinstance(value, float) and math.isfinite(value):
        if point.codec.type == "float32":
            return float(f"{value:.7g}")
        if point.codec.scale != 1 or point.codec.offset != 0:
            return float(f"{value:.12g}")
    return value
