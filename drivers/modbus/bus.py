"""One RS-485 line: one task, one transaction at a time; schedule.py decides what next, the task does the I/O."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from pymodbus.pdu import ModbusPDU

from drivers.modbus import budget, report
from drivers.modbus.device import Device
from drivers.modbus.planner import READ_TABLES, ReadRequest
from drivers.modbus.schedule import (
    RECONNECT_BACKOFF_MAX,
    Idle,
    LineSchedule,
    Poll,
    PortWait,
    Reopen,
    ServePassthrough,
    ServeWrites,
)
from drivers.modbus.schedule import REOPEN_BACKOFF_MAX as REOPEN_BACKOFF_MAX  # hil/scenarios.py reads it here
from drivers.modbus.served import LineRequests, PendingPassthrough, passthrough_timeout
from drivers.modbus.settings import LineSettings
from drivers.modbus.stats import BusStats
from drivers.modbus.transactions import LineTransactions
from drivers.modbus.transport import ModbusLink
from drivers.modbus.writes import PendingRawWrite, PendingWrite, encode_write
from gateway.errors import (
    BusUnavailable,
    CodecError,
    CrcError,
    DeviceError,
    DeviceException,
    DeviceTimeout,
    WriteRejected,
)
from gateway.types import DeviceProfile, DeviceState, ModbusLineSnapshot, Sample, Value, Write, WriteResult, now_ms

log = logging.getLogger(__name__)

#: How long opening the port may take (pymodbus' connect timeout).
OPEN_TIMEOUT = 3.0
#: The line's task wakes at least this often, so that `alive_at` stays fresh on an idle line.
ALIVE_TICK = 1.0
#: Allowed on top of the longest single step of the task: scheduling delays, the quiet gap.
ALIVE_SLACK = 2.0


def line_budget(cfg: LineSettings) -> budget.LineBudget:
    """The share of the line that one cycle of every device's plan needs."""
    plans = ((job.interval, job.requests) for dev in cfg.devices for job in Device(dev, cfg).jobs)
    return budget.plan_budget(cfg, plans)


class ModbusBus:
    """Polls every device of one line and carries out writes, one transaction at a time."""

    def __init__(
        self,
        cfg: LineSettings,
        on_sample: Callable[[Sample], None],
        on_state: Callable[[DeviceState], None],
        *,
        link: ModbusLink | None = None,
    ) -> None:
        self.cfg = cfg
        self.devices = {d.name: Device(d, cfg) for d in cfg.devices}
        self.stats = BusStats()
        self._on_sample = on_sample
        self._on_state = on_state
        self._link = link or ModbusLink(
            cfg.port,
            framing=cfg.framing,
            baudrate=cfg.baudrate,
            parity=cfg.parity,
            bytesize=cfg.bytesize,
            stopbits=cfg.stopbits,
            connect_timeout=cfg.connect_timeout,
            rs485=cfg.rs485,
        )
        self._writes: asyncio.Queue[PendingWrite | PendingRawWrite] = asyncio.Queue()
        self._passthrough: deque[PendingPassthrough] = deque()
        self._wake = asyncio.Event()
        self._schedule = LineSchedule(
            self.devices.values(), reopen_backoff_max=RECONNECT_BACKOFF_MAX if cfg.is_tcp else None
        )
        self._io = LineTransactions(cfg, self._link, self._schedule, self.stats)
        self._requests = LineRequests(self._io, on_sample, self._log_once, self._passthrough_heard)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._logged: set[tuple[str, str, str]] = set()
        #: The longest a healthy line goes without moving: longer means its task is stuck.
        self.alive_limit = self._longest_step() + ALIVE_TICK + ALIVE_SLACK

    @property
    def name(self) -> str:
        """The line's name."""
        return self.cfg.name

    @property
    def alive_at(self) -> float:
        """Monotonic time the line's task last moved (an iteration, a transaction, a back-off step)."""
        return self._io.alive_at

    @alive_at.setter
    def alive_at(self, when: float) -> None:
        self._io.alive_at = when

    def profiles(self) -> list[DeviceProfile]:
        """What the router needs to know of each device on the line; writes go through this line."""
        return [
            DeviceProfile(
                dev.name,
                dev.full_every,
                {p.name: p.deadband for p in dev.points if p.deadband},
                self.write,
                write_rate=dev.write_rate,
                write_burst=dev.write_burst,
                points=frozenset(p.name for p in dev.points),
            )
            for dev in self.cfg.devices
        ]

    @property
    def stopping(self) -> bool:
        """True once stop() was called: the line is going away, not stuck."""
        return self._stopping

    @property
    def port_open(self) -> bool:
        """Whether the line's port is open now."""
        return self._link.connected

    @property
    def running(self) -> bool:
        """True from start to stop while the line's task has not ended (it never should on its own)."""
        return self._task is not None and not self._task.done()

    def snapshot(self) -> ModbusLineSnapshot:
        """The line's counters, devices and liveness as of now (what the metrics, status page and watchdog show)."""
        return report.line_snapshot(
            self.name,
            self.cfg,
            self.stats,
            self.devices.values(),
            running=self.running,
            stopping=self.stopping,
            alive_at=self.alive_at,
            alive_limit=self.alive_limit,
        )

    def _longest_step(self) -> float:
        # Between two `alive_at` stamps the task does at most one transaction or one open.
        longest = max(OPEN_TIMEOUT, self.cfg.connect_timeout)
        for device in self.devices.values():
            for job in device.jobs:
                for r in job.requests:
                    longest = max(longest, device.timeout(r.table, r.count))
            for p in device.points.values():
                if p.writable:
                    longest = max(longest, device.timeout(p.table, p.codec.count, write=True))
            # A Modbus TCP server client's pass-through or write, of any size it may ask.
            longest = max(longest, device.timeout("holding", 125), device.timeout("holding", 123, write=True))
        # The silence kept before a request is a step too (a settle after a failure is at most one timeout).
        return max(longest, self._io.quiet.seconds)

    async def start(self) -> None:
        """Start the line's task; the port is opened (and reopened) by the task itself."""
        now = time.monotonic()
        self.alive_at = now
        self._schedule.start(now)
        self._task = asyncio.create_task(self._run(), name=f"modbus:{self.name}")

    async def stop(self) -> None:
        """Stop polling and close the port; pending writes fail."""
        self._stopping = True
        task, self._task = self._task, None
        # On Python 3.11 asyncio.wait_for (inside pymodbus) can swallow a cancel that lands in
        # the same loop step as a response; cancel until the task has really ended.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        self._fail_clients(f"line {self.name} is stopping")
        while not self._writes.empty():
            pending = self._writes.get_nowait()
            if isinstance(pending, PendingWrite) and not pending.future.done():
                pending.future.set_result(WriteResult(ok=False, error="gateway stopping"))
        self._link.close()
        self._io.quiet.close()

    async def write(self, request: Write) -> WriteResult:
        """Write one point; jumps ahead of polling. Never raises for a bad request: the result says why."""
        device = self.devices.get(request.device)
        if device is None:
            return WriteResult(ok=False, error=f"unknown device {request.device!r}")
        try:
            point, words = encode_write(device, request)
        except (WriteRejected, CodecError) as exc:
            return WriteResult(ok=False, error=str(exc))
        if not self._link.connected:
            return WriteResult(ok=False, error=f"line {self.name} is down ({self.cfg.port} is not open)")
        if device.online is False:
            return WriteResult(ok=False, error=f"{device.name} is offline")
        fut: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        await self._writes.put(PendingWrite(device, point, words, fut, request.deadline))
        self._wake.set()
        return await fut

    @property
    def passthrough_waiting(self) -> int:
        """Pass-through requests queued for the line now."""
        return len(self._passthrough)

    async def pass_through(self, device: str, request: ModbusPDU, timeout: float | None = None) -> ModbusPDU:
        """Carry out a Modbus TCP server client's request on the device's unit, in the line's own schedule.

        Returns the device's response as it came, an exception response included. Raises DeviceTimeout when the
        device does not answer, DeviceError when it is offline, BusUnavailable when the line is down or stopping.
        """
        dev = self._reachable(device)
        if timeout is None:
            timeout = passthrough_timeout(dev, request)
        fut: asyncio.Future[ModbusPDU] = asyncio.get_running_loop().create_future()
        self._passthrough.append(PendingPassthrough(dev, request, timeout, fut))
        self._wake.set()
        return await fut

    async def raw_write(self, device: str, request: ModbusPDU, origin: str) -> ModbusPDU:
        """Carry out a Modbus TCP server client's write request on the device's unit, queued with the line's writes.

        The written points are read back and published, as after an MQTT write. Returns the device's response as
        it came (an exception response included); raises as `pass_through` does.
        """
        dev = self._reachable(device)
        fut: asyncio.Future[ModbusPDU] = asyncio.get_running_loop().create_future()
        await self._writes.put(PendingRawWrite(dev, request, origin, fut))
        self._wake.set()
        return await fut

    def _reachable(self, device: str) -> Device:
        """The device, when a request for it may wait for the line: DeviceError when it is offline, BusUnavailable
        when the line is down."""
        dev = self.devices[device]
        if self._stopping or not self._link.connected:
            raise BusUnavailable(f"line {self.name} is down ({self.cfg.port} is not open)")
        if dev.online is False:
            raise DeviceError(f"{dev.name} is offline")
        return dev

    # --- the line's task ------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            self.alive_at = now = time.monotonic()
            writes_waiting = not self._writes.empty()
            while self._passthrough and self._passthrough[0].future.done():
                self._passthrough.popleft()  # its client went away while it waited: it costs the line nothing
            step = self._schedule.next_step(
                now,
                port_open=self._link.connected,
                writes_waiting=writes_waiting,
                passthrough_unit=self._passthrough[0].device.unit if self._passthrough else None,
                passthrough_takes=self._passthrough[0].expected if self._passthrough else 0.0,
            )
            match step:
                case Reopen():
                    self._fail_clients(f"line {self.name} is down ({self.cfg.port} is not open)")
                    await self._reopen()
                case PortWait(until):
                    await asyncio.sleep(min(until - now, ALIVE_TICK))
                case ServeWrites():
                    await self._serve_writes()
                case ServePassthrough():
                    await self._serve_passthrough()
                case Idle(until):
                    self._wake.clear()
                    try:
                        # Never asleep for long, even when the next poll is minutes away: see `alive_at`.
                        async with asyncio.timeout(min(until - now, ALIVE_TICK)):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
                case Poll():
                    await self._run_cycle(step)

    def _fail_clients(self, reason: str) -> None:
        """Tell the Modbus TCP server's clients waiting for the line that it is gone (their writes too: one carried
        out when the port is back, long after its client gave up, would surprise whoever sent it)."""
        while self._passthrough:
            waiting = self._passthrough.popleft()
            if not waiting.future.done():
                waiting.future.set_exception(BusUnavailable(reason))
        kept: list[PendingWrite] = []
        while not self._writes.empty():
            pending = self._writes.get_nowait()
            if not isinstance(pending, PendingRawWrite):
                kept.append(pending)  # an MQTT write waits for the port, as it always did
            elif not pending.future.done():
                pending.future.set_exception(BusUnavailable(reason))
        for pending in kept:
            self._writes.put_nowait(pending)

    async def _serve_writes(self) -> None:
        while not self._writes.empty():
            pending = self._writes.get_nowait()
            if isinstance(pending, PendingRawWrite):
                await self._requests.raw_write(pending)
            else:
                await self._requests.write(pending)

    async def _serve_passthrough(self) -> None:
        pending = self._passthrough.popleft()
        started = time.monotonic()
        try:
            await self._requests.pass_through(pending)
        finally:
            ended = time.monotonic()
            self._schedule.passthrough_done(ended, ended - started)

    async def _reopen(self) -> None:
        self.stats.reopen_attempts += 1
        try:
            await self._link.open()
        except BusUnavailable as exc:
            if not self._schedule.reopening:
                log.warning("line %s: %s; retrying with back-off", self.name, exc)
            for device in self._schedule.port_failed(time.monotonic()):
                self._announce(device, False, str(exc))
            return
        if self._schedule.reopening:
            log.info("line %s: %s is open again", self.name, self.cfg.port)
        self._schedule.port_opened(time.monotonic())

    async def _run_cycle(self, poll: Poll) -> None:
        device = poll.job.device
        ts = now_ms()
        values: dict[str, Value] = {}
        failure: DeviceError | None = None
        answered = False
        for request in poll.requests:
            # Writes jump the queue, also between the reads of one cycle.
            await self._serve_writes()
            try:
                data = await self._transact(device, request, retries=poll.retries)
            except DeviceException as exc:
                # The device is alive; this block is not readable. Keep going with the others.
                answered = True
                self._log_once(device, f"{request.table}@{request.address}", exc)
                continue
            except DeviceError as exc:
                failure = exc
                break  # a silent device must not hold the line for its remaining blocks
            answered = True
            values.update(device.decode(request, data))
        change = self._schedule.poll_done(poll, time.monotonic(), answered=answered, failed=failure is not None)
        if change is True:
            self._announce(device, True, "answering")
        elif change is False:
            self._announce(device, False, str(failure))
        if values:
            self._on_sample(Sample(device=device.name, ts=ts, values=values))

    async def _transact(self, device: Device, request: ReadRequest, *, retries: int) -> list[int] | list[bool]:
        return await self._io.read(device, request, retries=retries)

    def _passthrough_heard(self, device: Device, request: ModbusPDU, failure: DeviceError | None) -> None:
        """A client's read tells whether its device answers, as a poll does: a device that died between two
        rare polls goes offline after `offline_after` silent reads, and its clients get exception 0x0B at once
        instead of each holding the line for a response timeout. Other functions say nothing of the device
        (some ignore a function they do not know)."""
        if request.function_code not in READ_TABLES:
            return
        if failure is None:
            if device.record_success():
                self._announce(device, True, "answering")
        elif isinstance(failure, DeviceTimeout | CrcError) and self._schedule.read_unanswered(device, time.monotonic()):
            self._announce(device, False, str(failure))

    def _announce(self, device: Device, online: bool, reason: str) -> None:
        if online:
            log.info("%s (unit %d on %s) is online", device.name, device.unit, self.name)
        else:
            log.warning("%s (unit %d on %s) is offline: %s", device.name, device.unit, self.name, reason)
        self._on_state(DeviceState(device.name, online, reason))

    def _log_once(self, device: Device, where: str, exc: Exception) -> None:
        key = (device.name, where, str(exc))
        if key not in self._logged:
            self._logged.add(key)
            log.warning("%s: reading %s: %s", device.name, where, exc)
