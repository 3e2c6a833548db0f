"""One line's transactions on its link: the silence before each, a unit's settle after a failure, and their counting.

The line's task (bus.py) decides what to carry out and when; this module carries out one read, write or
pass-through at a time and keeps the line's timing rules around it, whoever asked for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from pymodbus.pdu import ModbusPDU

from drivers.modbus import budget
from drivers.modbus.device import Device
from drivers.modbus.planner import ReadRequest
from drivers.modbus.schedule import LineSchedule
from drivers.modbus.settings import LineSettings
from drivers.modbus.stats import BusStats, count_answered_read, count_transaction
from drivers.modbus.timing import QuietGap
from drivers.modbus.transport import ModbusLink
from drivers.modbus.writes import written_range
from gateway.errors import BusUnavailable, DeviceError, DeviceException


class LineTransactions:
    """Carries out one transaction at a time on a line's link, keeping the quiet gap and every unit's settle."""

    def __init__(self, cfg: LineSettings, link: ModbusLink, schedule: LineSchedule, stats: BusStats) -> None:
        self.cfg = cfg
        self.link = link
        self.schedule = schedule
        self.stats = stats
        self.bits_per_char = budget.char_bits(cfg.bytesize, cfg.parity, cfg.stopbits)
        if cfg.inter_request_delay is not None:
            gap = cfg.inter_request_delay
        else:
            # Modbus TCP frames are delimited by their header, not by silence.
            gap = 0.0 if cfg.mbap else budget.t35(cfg.baudrate, self.bits_per_char)
        self.quiet = QuietGap(gap, cfg.name)
        #: Monotonic time the line last moved (see ModbusBus.alive_at, which is this).
        self.alive_at = time.monotonic()

    async def read(self, device: Device, request: ReadRequest, *, retries: int) -> list[int] | list[bool]:
        """One planned read with up to `retries` more tries; the answer goes into the device's cache."""
        timeout = device.timeout(request.table, request.count)
        last: DeviceError | None = None
        await self.settled(device.unit)
        for _ in range(retries + 1):
            await self.quiet_gap()
            started = time.monotonic()
            try:
                data = await self.link.read(request.table, device.unit, request.address, request.count, timeout)
            except DeviceError as exc:
                # A transaction counts once it ended (answered or failed); one cut short by stop() does not.
                count_transaction(self.stats, device.stats, exc)
                last = exc
                if isinstance(exc, BusUnavailable | DeviceException):
                    raise
                self.settle(device.unit, timeout)
                continue
            finally:
                self.quiet.last_end = self.alive_at = time.monotonic()
            # The line went quiet with the answer's last byte, not when the answer was decoded: the
            # silence before the next request and the response time count from that byte.
            if started < self.link.last_rx < self.quiet.last_end:
                self.quiet.last_end = self.link.last_rx
            device.cache.store(request.table, request.address, data, self.quiet.last_end)
            req, resp = budget.transaction_bytes(request.table, request.count)
            # Modbus TCP has no serial wire to fill: its utilisation stays 0.
            wire = 0.0 if self.cfg.mbap else budget.transaction_time(req, resp, self.cfg.baudrate, self.bits_per_char)
            count_answered_read(self.stats, device.stats, self.quiet.last_end - started, wire)
            if last is not None:
                # A retry answered, maybe by the late answer to the attempt before: its own answer may still
                # come, as late as a failed attempt's could (one timeout past the timeout).
                self.schedule.settle(device.unit, started + 2 * timeout)
            return data
        assert last is not None
        raise last

    async def write(self, device: Device, table: str, address: int, words: Sequence[int] | Sequence[bool]) -> None:
        """One write of `words` at `address`; raises the DeviceError it failed with."""
        device.stats.writes += 1
        timeout = device.timeout(table, len(words), write=True)
        await self.settled(device.unit)
        await self.quiet_gap()
        failure: DeviceError | None = None
        # Before the request goes out: from then on the device may hold the new values.
        device.cache.invalidate(table, address, len(words))
        try:
            await self.link.write(table, device.unit, address, words, timeout)
        except DeviceError as exc:
            failure = exc
        finally:
            self.quiet.last_end = self.alive_at = time.monotonic()
            # Counted also when stop() cuts it short: the request may have gone out.
            count_transaction(self.stats, device.stats, failure, write=True)
        if failure is not None:
            self._failed(device.unit, failure, timeout)
            raise failure

    async def execute(self, device: Device, request: ModbusPDU, timeout: float, *, write: bool) -> ModbusPDU:
        """One request of a Modbus TCP server client, as it came; the device's response as it came.

        `write`: it is a write (counted as the line's and the device's write), else a pass-through.
        Raises the DeviceError it failed with (no answer, line down); an exception response is returned.
        """
        if write:
            device.stats.writes += 1
        await self.settled(device.unit)
        await self.quiet_gap()
        if (written := written_range(request)) is not None:
            # A write (or a pass-through 0x17): from when the request goes out the device may hold new values.
            device.cache.invalidate(*written)
        failure: DeviceError | None = None
        response: ModbusPDU | None = None
        try:
            response = await self.link.execute(request, device.unit, timeout)
        except DeviceError as exc:
            failure = exc
        finally:
            self.quiet.last_end = self.alive_at = time.monotonic()
            if write:
                refused = None
                if response is not None and response.isError():
                    refused = DeviceException("exception response", int(response.exception_code))
                count_transaction(self.stats, device.stats, failure or refused, write=True)
            else:
                # Counted apart from the polls' transactions (a line's are the sum of its devices').
                self.stats.passthrough += 1
                self.stats.passthrough_failed += failure is not None
        if failure is not None:
            self._failed(device.unit, failure, timeout)
            raise failure
        assert response is not None
        return response

    def _failed(self, unit: int, failure: DeviceError, timeout: float) -> None:
        if not isinstance(failure, BusUnavailable | DeviceException):
            self.settle(unit, timeout)

    async def quiet_gap(self) -> None:
        """Keep the line's silence since the last frame before the next request."""
        if await self.quiet.wait():
            self.alive_at = time.monotonic()

    def settle(self, unit: int, timeout: float) -> None:
        """After a timeout or a garbled answer from `unit`, its next *other* request waits one more response
        timeout (libmodbus does this line-wide): an answer the unit sends late then arrives while nothing waits
        for it and pymodbus drops it, instead of arriving during that request, where the same unit, function
        and length would pass it as the answer to a different read. A retry of the same request needs no wait
        (the late answer is its answer), nor does another unit (pymodbus refuses an answer from the wrong unit):
        the line's task polls the other units while this one settles (see `LineSchedule.next_step`)."""
        self.schedule.settle(unit, time.monotonic() + timeout)

    async def settled(self, unit: int) -> None:
        """Wait until `unit`'s settle is over, if it has one."""
        wait = self.schedule.end_settle(unit) - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
            self.alive_at = time.monotonic()
