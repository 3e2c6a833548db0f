"""The Modbus line's schedule without I/O: which poll runs next and when, deferrals, probes and back-off.

The line's task (bus.py) asks `LineSchedule.next_step(now, ...)` what to do, does the I/O and the
waiting, and reports what happened (`poll_done`, `port_failed`, `port_opened`, `settle`). Every
decision takes the clock as an argument, so the rules are tested with a clock the test sets:

- Writes go before polls (the task also serves them between the reads of one cycle).
- Pass-through requests (the Modbus TCP server's clients) go after writes and before polls, but while
  polls are due they take turns with them: after a pass-through, the due polls go first for POLLS_FIRST
  (9) times as long as the pass-through held the line, and at least one of them. Meanwhile a pass-through
  goes between polls only where it fits: when it will likely end (as long as its device's last answer
  took) before the next poll falls due, or by half a poll interval after (a fixed-rate cycle that starts
  that late keeps its slot). The clients get the line's spare time and a tenth of a busy one, however
  long their requests take (a 125-register read, a slow device's answer, a silent unit's timeout): never
  the polled devices' own. One for a unit that settles waits for the settle, as that unit's polls do,
  while the other units' polls go on.
- Fixed rate: a cycle is due one interval after the previous one was *due*; a cycle that could not
  start in time is skipped and counted, never queued up.
- An offline device is probed instead of polled: its due job's first read, one try, with back-off
  (`Device.record_failure`). Until the probe is due its jobs wait in the queue, so it never holds up
  a live device.
- A unit that timed out or answered garbled *settles*: its next request waits until its late answer
  can no longer come. Its jobs wait meanwhile (keeping their due times) and the other units' run.
- A port that cannot be opened is retried with back-off; its devices go offline at once, and are
  probed at once when it opens again.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from drivers.modbus.device import Device, PollJob
from drivers.modbus.planner import ReadRequest

REOPEN_BACKOFF_START = 1.0
REOPEN_BACKOFF_MAX = 30.0
#: A Modbus TCP endpoint is reconnected with back-off up to a minute (a PLC rebooting, a network gone).
RECONNECT_BACKOFF_MAX = 60.0
#: After a pass-through, the polls that fall due within this many times as long go first, and a pass-through
#: fits between them only where it cannot cost one its slot: while polls are due, clients get a tenth of the line's
#: time (a slow device's answers or timeouts included), and all the time no poll needs. Shared by count (one
#: for one) or half and half, clients reading a device that answers late left the polls two thirds of their rate.
POLLS_FIRST = 9.0
#: How far ahead an idle line with no poll jobs at all looks (it wakes earlier for writes and its tick).
IDLE_HORIZON = 3600.0


@dataclass(frozen=True, slots=True)
class Reopen:
    """The port is closed and its back-off is over: try to open it now."""


@dataclass(frozen=True, slots=True)
class PortWait:
    """The port is closed: the next attempt to open it is due at `until`."""

    until: float


@dataclass(frozen=True, slots=True)
class ServeWrites:
    """Writes are queued: carry them out before any poll."""


@dataclass(frozen=True, slots=True)
class ServePassthrough:
    """A pass-through request is queued and its turn has come: carry out one."""


@dataclass(frozen=True, slots=True)
class Idle:
    """Nothing is due before `until`: wait for it, or for a write."""

    until: float


@dataclass(frozen=True, slots=True)
class Poll:
    """Run one cycle of `job` that was due at `due`: each of `requests`, with `retries` more tries each."""

    job: PollJob
    due: float
    requests: tuple[ReadRequest, ...]
    retries: int
    probing: bool  # the device is offline: this is one read to see whether it answers again


Step = Reopen | PortWait | ServeWrites | ServePassthrough | Idle | Poll


class LineSchedule:
    """The poll queue of one line and the decisions on it; the caller passes the clock."""

    def __init__(self, devices: Iterable[Device], *, reopen_backoff_max: float | None = None) -> None:
        self.devices = list(devices)
        # None: REOPEN_BACKOFF_MAX as it is when the schedule is built (tests shorten it).
        self.reopen_backoff_max = REOPEN_BACKOFF_MAX if reopen_backoff_max is None else reopen_backoff_max
        # A pass-through ran: the next due poll goes first, and so do all due polls until this time.
        self._poll_owed = False
        # How late a poll may start for a pass-through that fits between polls: half the shortest poll interval
        # (a fixed-rate cycle that starts that late keeps its slot; see _next_due).
        intervals = [job.interval for device in self.devices for job in device.jobs]
        self._poll_slack = 0.5 * min(intervals, default=0.0)
        self._polls_first_until = 0.0
        self._queue: list[tuple[float, int, PollJob]] = []  # (when to look at the job again, tie-break, job)
        self._order = itertools.count()
        # unit -> until when its next request must wait: a late answer must not meet a different request.
        self._settle_until: dict[int, float] = {}
        self.reopen_backoff = REOPEN_BACKOFF_START
        self.reopen_at = 0.0
        self._open_failed = False
        # The port opened and nothing has answered on it yet: it is not known to work.
        self._unproven = False

    @property
    def reopening(self) -> bool:
        """Whether the port failed to open at least once since it was last open."""
        return self._open_failed

    def start(self, now: float) -> None:
        """Make every job of every device due at `now`."""
        for device in self.devices:
            for job in device.jobs:
                job.due = now
                self._push(job.due, job)

    def next_step(
        self,
        now: float,
        *,
        port_open: bool,
        writes_waiting: bool,
        passthrough_unit: int | None = None,
        passthrough_takes: float = 0.0,
    ) -> Step:
        """What the line does next at `now`: open the port, serve writes or a pass-through, poll a job, or wait.

        `passthrough_unit`: the unit of the pass-through request next in line, None when none waits;
        `passthrough_takes`: how long it will likely hold the line.
        """
        if not port_open:
            return Reopen() if self.reopen_at <= now else PortWait(self.reopen_at)
        if writes_waiting:
            return ServeWrites()
        step = self._next_poll(now)
        if passthrough_unit is None:
            return step
        settling = self._settle_until.get(passthrough_unit, 0.0)
        if settling > now:
            # Its unit's late answer may still come: the other units' polls use the line meanwhile.
            return Idle(min(step.until, settling)) if isinstance(step, Idle) else step
        if isinstance(step, Poll):
            if self._poll_owed or now < self._polls_first_until:
                return step
            # Its turn comes after this pass-through: back in the queue where it was.
            self._push(step.job.due, step.job)
        elif now < self._polls_first_until and now + passthrough_takes > step.until + self._poll_slack:
            # The clients had their share, and this one may still hold the line when the next poll falls due:
            # it goes when that poll is done, or when the clients' turn comes again.
            return Idle(min(step.until, self._polls_first_until))
        return ServePassthrough()

    def passthrough_done(self, now: float, took: float) -> None:
        """A pass-through ended at `now` after holding the line `took` seconds: the polls due meanwhile go first,
        one at least and as many as fall due in POLLS_FIRST times as long."""
        self._poll_owed = True
        self._polls_first_until = now + took * POLLS_FIRST

    def _next_poll(self, now: float) -> Poll | Idle:
        while self._queue:
            at, _, job = self._queue[0]
            if at > now:
                return Idle(at)
            heapq.heappop(self._queue)
            device = job.device
            settling = self._settle_until.get(device.unit, 0.0)
            if settling > now:
                # The unit's late answer may still come: poll the other units meanwhile instead of
                # holding the line idle. The job keeps its own due time, so its schedule does not shift.
                self._push(settling, job)
                continue
            if device.online is False and now < device.next_probe:
                # Offline devices are probed with back-off instead of polled.
                job.due = device.next_probe
                self._push(job.due, job)
                continue
            probing = device.online is False
            # Retries are for a healthy device's occasional noise; a device that failed its last poll
            # gets one try per poll, so that a dead one holds the line less.
            retries = device.retries if device.failures == 0 else 0
            requests = job.requests[:1] if probing else job.requests
            return Poll(job, job.due, tuple(requests), retries, probing)
        return Idle(now + IDLE_HORIZON)

    def poll_done(self, poll: Poll, now: float, *, answered: bool, failed: bool) -> bool | None:
        """Take in how a cycle ended at `now` and queue its job's next cycle.

        `answered`: some read of the cycle got an answer; `failed`: a read failed (the cycle stopped there).
        Returns True when the cycle brought the device online, False when it took it offline, else None.
        """
        job, device = poll.job, poll.job.device
        device.stats.cycles += 1
        self._poll_owed = False
        change: bool | None = None
        if answered and self._unproven:
            # Something answered on the port since it opened: a later loss reopens at once, backing off afresh.
            self._unproven = False
            self.reopen_backoff = REOPEN_BACKOFF_START
            self.reopen_at = 0.0
        if answered and not failed:
            if device.record_success():
                change = True
        elif failed and device.record_failure(now):
            change = False
        job.due = self._next_due(poll, now)
        self._push(job.due, job)
        return change

    def read_unanswered(self, device: Device, now: float) -> bool:
        """A client's read of `device` went unanswered at `now`, counted as a failed poll; True when this took the
        device offline, its jobs then waiting for its probes (not for their next due time, maybe an hour away)."""
        if not device.record_failure(now):
            return False
        self._queue = [entry for entry in self._queue if entry[2].device is not device]
        heapq.heapify(self._queue)
        for job in device.jobs:
            job.due = device.next_probe
            self._push(job.due, job)
        return True

    def _next_due(self, poll: Poll, now: float) -> float:
        job, device = poll.job, poll.job.device
        if device.online is False:
            return device.next_probe
        if poll.probing:
            # Back online: poll the whole plan now.
            return now
        # Fixed rate: the next cycle is due one interval after this one was due; cycles that
        # could not start in time are skipped, not queued up.
        next_due = poll.due + job.interval
        if next_due <= now:
            missed = int((now - next_due) // job.interval) + 1
            device.stats.skipped_cycles += missed
            next_due += missed * job.interval
        return next_due

    def settle(self, unit: int, until: float) -> None:
        """`unit`'s next request must not go before `until` (its late answer may still come)."""
        self._settle_until[unit] = until

    def end_settle(self, unit: int) -> float:
        """Forget `unit`'s settle: when its next request may go (0.0 when it need not wait)."""
        return self._settle_until.pop(unit, 0.0)

    def port_failed(self, now: float) -> list[Device]:
        """The port could not be opened at `now`: back off; returns the devices this took offline."""
        offline = [device for device in self.devices if device.record_failure(now, unreachable=True)]
        self._open_failed = True
        self.reopen_at = now + self.reopen_backoff
        self.reopen_backoff = min(self.reopen_backoff * 2, self.reopen_backoff_max)
        return offline

    def port_opened(self, now: float) -> None:
        """The port opened at `now`: offline devices are probed at once; the back-off starts afresh once an answer
        comes (`poll_done`)."""
        self._open_failed = False
        # Until then an open counts as an attempt: a peer that accepts a connection and closes it at once (or a
        # port that is lost as soon as it opens) is reopened with back-off, not as fast as the task can loop.
        self._unproven = True
        self.reopen_at = now + self.reopen_backoff
        self.reopen_backoff = min(self.reopen_backoff * 2, self.reopen_backoff_max)
        # Devices taken offline while the port was gone did not stop answering: probe each at once,
        # not after the back-off their failed reopen attempts built up (a replugged adapter gives data
        # again within a poll, not a minute later).
        for device in self.devices:
            device.line_restored(now)

    def _push(self, at: float, job: PollJob) -> None:
        heapq.heappush(self._queue, (at, next(self._order), job))
