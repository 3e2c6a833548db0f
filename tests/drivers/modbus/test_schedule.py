"""The Modbus line's schedule in memory: no pty, no sleeps, a clock the test sets.

`LineTask` plays the line's task (bus.py) around the schedule: it asks for the next step, "does" each
read in a fixed time of the test's clock (a unit in `dead` never answers: each try costs a whole
timeout and leaves the unit settling), and reports back. The promises of the README's "Behaviour
worth knowing" are checked on that, case by case.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from drivers.modbus.codec import PointCodec
from drivers.modbus.device import PROBE_BACKOFF_MAX, PROBE_LINE_SHARE, Device
from drivers.modbus.schedule import (
    IDLE_HORIZON,
    REOPEN_BACKOFF_MAX,
    Idle,
    LineSchedule,
    Poll,
    PortWait,
    Reopen,
    ServePassthrough,
    ServeWrites,
)
from drivers.modbus.settings import DeviceSettings, LineSettings, PointSettings

TIMEOUT = 0.1  # every request's response timeout on these lines
READ = 0.005  # how long one answered read holds the line


def device(name: str, unit: int, *addresses: int, poll: float = 1.0, **settings: object) -> DeviceSettings:
    """A device polling one uint16 holding register at each address (an (address, poll) pair polls at its own rate)."""
    points = tuple(
        PointSettings(f"r{a}", "holding", a, PointCodec("uint16"), poll=p)
        for a, p in ((x, None) if isinstance(x, int) else x for x in addresses)
    )
    return DeviceSettings(name, unit, poll=poll, max_gap=0, points=points, **settings)  # type: ignore[arg-type]


def line(*devices: DeviceSettings, retries: int = 1, offline_after: int = 3) -> LineSchedule:
    """The schedule of a line with these devices and a fixed response timeout."""
    settings = LineSettings(
        "line", "/dev/null", timeout=TIMEOUT, retries=retries, offline_after=offline_after, devices=devices
    )
    return LineSchedule(Device(d, settings) for d in devices)


def named(schedule: LineSchedule, name: str) -> Device:
    """One device of the schedule's line by name."""
    return next(d for d in schedule.devices if d.name == name)


@dataclass
class LineTask:
    """The line's task in memory, on a clock the test moves; notes every poll it ran and when."""

    schedule: LineSchedule
    dead: set[int] = field(default_factory=set)
    now: float = 0.0
    ran: list[tuple[float, Poll]] = field(default_factory=list)
    tries: dict[str, int] = field(default_factory=dict)  # device -> transactions it took

    def __post_init__(self) -> None:
        self.schedule.start(self.now)

    def run(self, until: float) -> list[tuple[float, Poll]]:
        """Poll until the clock reaches `until`; returns the polls of this run with their start times."""
        first = len(self.ran)
        while self.now < until:
            step = self.schedule.next_step(self.now, port_open=True, writes_waiting=False)
            if isinstance(step, Idle):
                self.now = min(step.until, until)
                continue
            assert isinstance(step, Poll), step
            self.ran.append((self.now, step))
            self.cycle(step)
        return self.ran[first:]

    def cycle(self, poll: Poll) -> None:
        """One cycle as bus.py runs it: each read waits for its unit to settle; a dead unit's stops the cycle."""
        device = poll.job.device
        failed = False
        for _ in poll.requests:
            self.now = max(self.now, self.schedule.end_settle(device.unit))
            if device.unit in self.dead:
                for _ in range(poll.retries + 1):
                    self.now += TIMEOUT
                    self.tries[device.name] = self.tries.get(device.name, 0) + 1
                    self.schedule.settle(device.unit, self.now + TIMEOUT)
                failed = True
                break
            self.now += READ
            self.tries[device.name] = self.tries.get(device.name, 0) + 1
        self.schedule.poll_done(poll, self.now, answered=not failed, failed=failed)


def starts(polls: list[tuple[float, Poll]], name: str) -> list[float]:
    """When each poll of device `name` started, rounded to the microsecond."""
    return [round(at, 6) for at, poll in polls if poll.job.device.name == name]


# --- what comes next ---------------------------------------------------------------------------------------------


def test_writes_go_before_a_due_poll_and_a_closed_port_before_both() -> None:
    schedule = line(device("d", 1, 0))
    schedule.start(10.0)
    assert schedule.next_step(10.0, port_open=True, writes_waiting=True) == ServeWrites()
    assert schedule.next_step(10.0, port_open=False, writes_waiting=True) == Reopen()
    step = schedule.next_step(10.0, port_open=True, writes_waiting=False)
    assert isinstance(step, Poll) and step.due == 10.0 and not step.probing
    # The job is out of the queue while it runs: nothing else is due.
    assert schedule.next_step(10.0, port_open=True, writes_waiting=False) == Idle(10.0 + IDLE_HORIZON)


def test_a_line_without_jobs_idles_and_wakes_for_writes() -> None:
    schedule = line()
    schedule.start(0.0)
    assert schedule.next_step(5.0, port_open=True, writes_waiting=False) == Idle(5.0 + IDLE_HORIZON)
    assert schedule.next_step(5.0, port_open=True, writes_waiting=True) == ServeWrites()


@pytest.mark.parametrize(
    ("interval", "due", "ended", "next_due", "skipped"),
    [
        # On time: the next cycle is due one interval after this one was due, not after it ended.
        (0.1, 0.0, 0.03, 0.1, 0),
        # Started late and ended late, still before the next due time: no drift.
        (0.1, 0.0, 0.099, 0.1, 0),
        # Overran by more than an interval: the cycles that could not start are skipped, not piled up,
        # and the next one stays on the grid of the first.
        (0.05, 0.0, 0.08, 0.1, 1),
        (1.0, 0.0, 3.5, 4.0, 3),
        (1.0, 7.0, 8.25, 9.0, 1),
    ],
)
def test_fixed_rate_skips_what_could_not_start_in_time(
    interval: float, due: float, ended: float, next_due: float, skipped: int
) -> None:
    schedule = line(device("d", 1, 0, poll=interval))
    schedule.start(due)
    poll = schedule.next_step(due, port_open=True, writes_waiting=False)
    assert isinstance(poll, Poll)
    assert schedule.poll_done(poll, ended, answered=True, failed=False) is True  # its first answer: online
    d = named(schedule, "d")
    assert poll.job.due == pytest.approx(next_due)
    assert d.stats.skipped_cycles == skipped
    assert d.stats.cycles == 1
    assert schedule.next_step(ended, port_open=True, writes_waiting=False) == Idle(poll.job.due)


def test_polls_stay_on_their_grid_however_long_each_cycle_took() -> None:
    # Three reads of 5 ms, then 40 ms more each (as if the machine was slow): a 55 ms cycle on a 50 ms grid.
    schedule = line(device("d", 1, 0, 10, 20, poll=0.05))
    task = LineTask(schedule)
    dues: list[float] = []
    for _ in range(12):
        step = schedule.next_step(task.now, port_open=True, writes_waiting=False)
        if isinstance(step, Idle):
            task.now = step.until
            continue
        assert isinstance(step, Poll)
        dues.append(step.due)
        task.now += 3 * READ + 0.04
        schedule.poll_done(step, task.now, answered=True, failed=False)
    steps = [d / 0.05 for d in dues]
    assert all(abs(s - round(s)) < 1e-6 for s in steps), steps
    gaps = [round(b - a, 6) for a, b in zip(steps, steps[1:], strict=False)]
    assert min(gaps) >= 1 and max(gaps) == 2, gaps  # never closer than one interval; every overrun skipped one
    # Each 55 ms cycle ran over the next slot of the grid (the last one's skip is counted too).
    assert named(schedule, "d").stats.skipped_cycles == sum(round(g) - 1 for g in gaps) + 1 == len(dues)


def test_two_poll_intervals_interleave_each_at_its_own_rate() -> None:
    # One device, a fast point (100 ms) and a slow one (250 ms): two jobs. A second device at 200 ms.
    schedule = line(device("a", 1, (0, 0.1), (10, 0.25)), device("b", 2, 0, poll=0.2))
    polls = LineTask(schedule).run(0.99)
    ran = [(round(at, 6), p.job.device.name, p.job.interval, round(p.due, 6)) for at, p in polls]
    # (start, device, interval, due): each cycle starts when due, or after the 5 ms reads ahead of it when
    # several are due at once (then in the order they were queued); its due time stays on its own grid.
    assert ran == [
        (0.0, "a", 0.1, 0.0),
        (0.005, "a", 0.25, 0.0),
        (0.01, "b", 0.2, 0.0),
        (0.1, "a", 0.1, 0.1),
        (0.2, "b", 0.2, 0.2),
        (0.205, "a", 0.1, 0.2),
        (0.25, "a", 0.25, 0.25),
        (0.3, "a", 0.1, 0.3),
        (0.4, "b", 0.2, 0.4),
        (0.405, "a", 0.1, 0.4),
        (0.5, "a", 0.25, 0.5),
        (0.505, "a", 0.1, 0.5),
        (0.6, "a", 0.1, 0.6),
        (0.605, "b", 0.2, 0.6),
        (0.7, "a", 0.1, 0.7),
        (0.75, "a", 0.25, 0.75),
        (0.8, "a", 0.1, 0.8),
        (0.805, "b", 0.2, 0.8),
        (0.9, "a", 0.1, 0.9),
    ]
    assert sum(d.stats.skipped_cycles for d in schedule.devices) == 0


# --- dead, settling and returning devices ------------------------------------------------------------------------


def test_a_dead_unit_goes_offline_then_is_only_probed_with_back_off() -> None:
    schedule = line(device("live", 1, 0, poll=0.05), device("dead", 2, 0, 10, poll=0.05), retries=1)
    task = LineTask(schedule, dead={2})
    dead, live = named(schedule, "dead"), named(schedule, "live")
    polls = task.run(1.0)
    assert dead.online is False and live.online is True
    # The first failed poll with its retry (2 tries), then one try per poll until offline (3 failed polls).
    dead_polls = [p for _, p in polls if p.job.device is dead]
    assert [p.retries for p in dead_polls[:3]] == [1, 0, 0]
    assert task.tries["dead"] == 4
    # Each probe holds the line for a whole timeout: the first comes after timeout / PROBE_LINE_SHARE.
    first_wait = TIMEOUT / PROBE_LINE_SHARE
    assert dead.backoff == pytest.approx(first_wait)
    offline_at = dead.next_probe - first_wait
    polls = task.run(offline_at + 130.0)
    probes = [(at, p) for at, p in polls if p.job.device is dead]
    assert all(p.probing and p.retries == 0 and len(p.requests) == 1 for _, p in probes)
    probe_starts = [at for at, _ in probes]
    waits = [b - a for a, b in zip([offline_at, *probe_starts], probe_starts, strict=False)]
    # 2 s, then doubling to PROBE_BACKOFF_MAX, counted from the end of each probe (one timeout after its start).
    assert waits == pytest.approx(
        [first_wait, 2 * first_wait + TIMEOUT, 4 * first_wait + TIMEOUT, 8 * first_wait + TIMEOUT]
        + [16 * first_wait + TIMEOUT, PROBE_BACKOFF_MAX + TIMEOUT],
        abs=0.06,  # a probe waits for the live unit's read in progress (5 ms) or its own settle
    )


def test_a_dead_neighbour_once_offline_leaves_the_live_unit_its_poll_rate() -> None:
    # The README's "its neighbours keep their poll rate" (the bench measures 98-100 % on a real line).
    schedule = line(device("live", 1, 0, poll=0.05), device("dead", 2, 0, poll=0.05))
    task = LineTask(schedule, dead={2})
    task.run(1.0)
    assert named(schedule, "dead").online is False
    polls = task.run(61.0)
    live = starts(polls, "live")
    assert len(live) >= 0.98 * 60 / 0.05, len(live)
    # Without the back-off (a dead unit polled every 50 ms, each poll a 100 ms timeout) it gets a third of that.
    assert len(starts(polls, "dead")) <= 6


def test_a_settling_unit_waits_while_the_other_units_use_the_line() -> None:
    # A unit that never answers but is never declared offline: after each timeout it settles one more timeout.
    schedule = line(device("live", 1, 0, poll=0.01), device("silent", 2, 0, poll=0.01, offline_after=100), retries=0)
    task = LineTask(schedule, dead={2})
    polls = task.run(2.0)
    silent, live = starts(polls, "silent"), starts(polls, "live")
    # One try per timeout + settle (the late answer cannot meet another request) ...
    assert len(silent) <= 2.0 / (2 * TIMEOUT) + 1
    assert all(b - a >= 2 * TIMEOUT - 1e-9 for a, b in zip(silent, silent[1:], strict=False)), silent
    # ... and the neighbour polls meanwhile: one cycle per 10 ms when the line is free, one per 100 ms timeout
    # at least (a settle that held the whole line would leave it one per 200 ms round).
    assert len(live) >= 2.0 / (TIMEOUT + READ), len(live)
    assert named(schedule, "silent").online is not False


def test_a_deferred_job_keeps_its_due_time() -> None:
    schedule = line(device("a", 1, 0, poll=1.0), device("b", 2, 0, poll=1.0))
    schedule.start(0.0)
    schedule.settle(1, 0.3)  # unit 1's late answer may come until 0.3
    first = schedule.next_step(0.0, port_open=True, writes_waiting=False)
    assert isinstance(first, Poll) and first.job.device.name == "b"
    schedule.poll_done(first, 0.01, answered=True, failed=False)
    assert schedule.next_step(0.01, port_open=True, writes_waiting=False) == Idle(0.3)
    late = schedule.next_step(0.3, port_open=True, writes_waiting=False)
    assert isinstance(late, Poll) and late.job.device.name == "a" and late.due == 0.0
    schedule.poll_done(late, 0.31, answered=True, failed=False)
    assert late.job.due == 1.0  # on its grid, not 1.3


def test_an_offline_unit_waits_for_its_probe_without_holding_up_the_others() -> None:
    # Unit 1 has two jobs (100 ms and 250 ms points): once the first takes it offline, the second waits too.
    schedule = line(device("a", 1, (0, 0.1), (10, 0.25)), device("b", 2, 0, poll=0.1), offline_after=1)
    schedule.start(0.0)
    a = named(schedule, "a")
    poll = schedule.next_step(0.0, port_open=True, writes_waiting=False)
    assert isinstance(poll, Poll) and poll.job is a.jobs[0]
    assert schedule.poll_done(poll, TIMEOUT, answered=False, failed=True) is False  # offline after 1 failure
    assert poll.job.due == a.next_probe == pytest.approx(TIMEOUT + TIMEOUT / PROBE_LINE_SHARE)
    b_poll = schedule.next_step(TIMEOUT, port_open=True, writes_waiting=False)
    assert isinstance(b_poll, Poll) and b_poll.job.device.name == "b"
    assert a.jobs[1].due == a.next_probe  # due at 0, but not polled: it waits for the probe


@pytest.mark.parametrize("failures_before", [0, 2])
def test_a_unit_that_answers_again_is_polled_in_full_at_once(failures_before: int) -> None:
    schedule = line(device("d", 1, 0, 10, 20, poll=0.5), offline_after=1)
    task = LineTask(schedule, dead={1})
    task.run(0.01)
    d = named(schedule, "d")
    assert d.online is False
    for _ in range(failures_before):
        task.run(d.next_probe + 0.01)
    task.dead.clear()
    task.now = d.next_probe
    probe = schedule.next_step(task.now, port_open=True, writes_waiting=False)
    assert isinstance(probe, Poll) and probe.probing and len(probe.requests) == 1 and probe.retries == 0
    task.now += READ
    assert schedule.poll_done(probe, task.now, answered=True, failed=False) is True
    full = schedule.next_step(task.now, port_open=True, writes_waiting=False)
    assert isinstance(full, Poll) and not full.probing
    assert len(full.requests) == 3 and full.retries == 1 and full.due == task.now
    assert d.backoff == d.probe_backoff_start  # a later outage backs off from the start again


def test_a_cycle_that_failed_after_some_answers_is_a_failed_poll() -> None:
    schedule = line(device("d", 1, 0, poll=0.1))
    schedule.start(0.0)
    poll = schedule.next_step(0.0, port_open=True, writes_waiting=False)
    assert isinstance(poll, Poll)
    assert schedule.poll_done(poll, 0.01, answered=True, failed=False) is True
    poll = schedule.next_step(0.1, port_open=True, writes_waiting=False)
    assert isinstance(poll, Poll)
    # One read answered (or answered with a Modbus exception: alive), a later one failed: not yet offline.
    assert schedule.poll_done(poll, 0.2, answered=True, failed=True) is None
    d = named(schedule, "d")
    assert d.failures == 1 and d.online is True
    retry = schedule.next_step(poll.job.due, port_open=True, writes_waiting=False)
    assert isinstance(retry, Poll) and retry.retries == 0  # a device that failed its last poll gets one try


# --- the port --------------------------------------------------------------------------------------------------


def test_a_port_that_cannot_open_is_retried_with_back_off_and_its_devices_go_offline_once() -> None:
    schedule = line(device("a", 1, 0), device("b", 2, 0))
    schedule.start(0.0)
    now, waits, offline = 0.0, [], []
    for _ in range(8):
        assert schedule.next_step(now, port_open=False, writes_waiting=True) == Reopen()
        offline.append([d.name for d in schedule.port_failed(now)])
        step = schedule.next_step(now, port_open=False, writes_waiting=False)
        assert isinstance(step, PortWait)
        waits.append(step.until - now)
        now = step.until
    assert offline == [["a", "b"]] + [[]] * 7  # announced once, at the first failure
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, REOPEN_BACKOFF_MAX, REOPEN_BACKOFF_MAX, REOPEN_BACKOFF_MAX]
    assert schedule.reopening


def test_devices_are_probed_at_once_when_the_port_opens_again() -> None:
    schedule = line(device("d", 1, 0, poll=0.1))
    schedule.start(0.0)
    now = 0.0
    for _ in range(6):
        schedule.port_failed(now)
        now += 1.0
    d = named(schedule, "d")
    assert d.online is False and d.next_probe > now + 5  # the failed opens backed the probes off
    schedule.port_opened(now)
    assert not schedule.reopening
    probe = schedule.next_step(now, port_open=True, writes_waiting=False)
    assert isinstance(probe, Poll) and probe.probing
    schedule.poll_done(probe, now, answered=True, failed=False)  # the port works: it answered
    schedule.port_failed(now + 1)
    assert schedule.next_step(now + 1, port_open=False, writes_waiting=False) == PortWait(now + 2)  # afresh


def test_a_port_lost_each_time_before_anything_answers_is_reopened_with_back_off() -> None:
    # A peer that accepts a connection and closes it at once: every open succeeds, nothing ever answers.
    schedule = line(device("d", 1, 0, poll=0.1))
    schedule.start(0.0)
    now, waits = 0.0, []
    for _ in range(7):
        assert schedule.next_step(now, port_open=False, writes_waiting=False) == Reopen()
        schedule.port_opened(now)
        step = schedule.next_step(now + 0.01, port_open=False, writes_waiting=False)  # lost again at once
        assert isinstance(step, PortWait)
        waits.append(step.until - now)
        now = step.until
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, REOPEN_BACKOFF_MAX, REOPEN_BACKOFF_MAX]
    assert not schedule.reopening  # each open succeeded: nothing to warn about at the next one
    # Once something answers, a loss reopens at once and the back-off starts afresh.
    schedule.port_opened(now)
    poll = schedule.next_step(now, port_open=True, writes_waiting=False)
    assert isinstance(poll, Poll)
    schedule.poll_done(poll, now + 0.05, answered=True, failed=False)
    assert schedule.next_step(now + 5, port_open=False, writes_waiting=False) == Reopen()
    schedule.port_failed(now + 5)
    assert schedule.next_step(now + 5, port_open=False, writes_waiting=False) == PortWait(now + 6)


# --- pass-through (the Modbus TCP server's clients) ---------------------------------------------------------------


def test_writes_go_before_a_pass_through_and_a_pass_through_before_a_due_poll() -> None:
    schedule = line(device("d", 1, 0))
    schedule.start(10.0)
    assert schedule.next_step(10.0, port_open=True, writes_waiting=True, passthrough_unit=1) == ServeWrites()
    assert schedule.next_step(10.0, port_open=False, writes_waiting=False, passthrough_unit=1) == Reopen()
    assert schedule.next_step(10.0, port_open=True, writes_waiting=False, passthrough_unit=1) == ServePassthrough()
    schedule.passthrough_done(10.001, 0.001)
    # The poll the pass-through went before is still queued, with its due time: its turn now, whoever waits.
    step = schedule.next_step(10.001, port_open=True, writes_waiting=False, passthrough_unit=1)
    assert isinstance(step, Poll) and step.due == 10.0
    schedule.poll_done(step, 10.002, answered=True, failed=False)
    # Nothing due: a waiting pass-through goes at once, again and again.
    for _ in range(3):
        assert (
            schedule.next_step(10.003, port_open=True, writes_waiting=False, passthrough_unit=1) == ServePassthrough()
        )
        schedule.passthrough_done(10.003, 0.0)
    assert schedule.next_step(10.003, port_open=True, writes_waiting=False) == Idle(11.0)


@dataclass
class BusyLineTask(LineTask):
    """The line's task with a client that always has a pass-through waiting, each holding the line `passthrough`
    seconds; notes every step."""

    passthrough: float = READ
    takes: float = 0.0  # the longest a pass-through may hold the line, as the line tells the schedule
    steps: list[tuple[float, str]] = field(default_factory=list)

    def run(self, until: float) -> list[tuple[float, Poll]]:
        """Serve the schedule until `until`, pass-through whenever it is its turn; returns the polls run."""
        first = len(self.ran)
        while self.now < until:
            step = self.schedule.next_step(
                self.now, port_open=True, writes_waiting=False, passthrough_unit=9, passthrough_takes=self.takes
            )
            if isinstance(step, Idle):  # the client waits for its turn: nothing else to do until then
                self.steps.append((self.now, "idle"))
                self.now = step.until
                continue
            if isinstance(step, ServePassthrough):
                self.steps.append((self.now, "pass-through"))
                self.now += self.passthrough
                self.schedule.passthrough_done(self.now, self.passthrough)
                continue
            assert isinstance(step, Poll), step
            self.steps.append((self.now, step.job.device.name))
            self.ran.append((self.now, step))
            self.cycle(step)
        return self.ran[first:]


def test_with_pass_through_always_waiting_due_polls_still_run_in_time() -> None:
    # Three devices whose polls need 3 x 5 ms of every 40 ms: a client that never stops takes the rest.
    schedule = line(*(device(f"d{u}", u, 0, poll=0.04) for u in (1, 2, 3)))
    task = BusyLineTask(schedule)
    polls = task.run(10.0)
    for d in schedule.devices:
        # Every cycle ran (250 in 10 s), none skipped; none later than the pass-through in progress and the two
        # other due polls with one pass-through before each (5 transactions; a pass-through before each poll is 6).
        assert d.stats.skipped_cycles == 0 and d.stats.cycles == 250, (d.name, d.stats)
        late = [at - p.due for at, p in polls if p.job.device is d]
        assert max(late) <= 5 * READ + 1e-9, (d.name, max(late))
    kinds = [kind for _, kind in task.steps]
    # The client gets the line's spare time: 10 s less the polls' 3.75 s, in 5 ms transactions.
    assert kinds.count("pass-through") == pytest.approx((10.0 - 750 * READ) / READ, abs=2)


def test_a_pass_through_for_a_settling_unit_waits_for_the_settle_while_the_others_poll() -> None:
    schedule = line(device("a", 1, 0, poll=1.0), device("b", 2, 0, poll=1.0))
    schedule.start(0.0)
    schedule.settle(1, 0.5)  # unit 1 timed out: its late answer may come until 0.5
    step = schedule.next_step(0.0, port_open=True, writes_waiting=False, passthrough_unit=1)
    assert isinstance(step, Poll) and step.job.device.name == "b"
    schedule.poll_done(step, 0.005, answered=True, failed=False)
    # Unit 1's poll and the pass-through both wait for the settle; the line idles until it ends, not longer.
    assert schedule.next_step(0.005, port_open=True, writes_waiting=False, passthrough_unit=1) == Idle(0.5)
    # A pass-through for another unit need not wait.
    assert schedule.next_step(0.005, port_open=True, writes_waiting=False, passthrough_unit=2) == ServePassthrough()
    schedule.passthrough_done(0.01, 0.005)
    # The settle is over: unit 1's poll first (a pass-through just had its turn), then its pass-through.
    step = schedule.next_step(0.5, port_open=True, writes_waiting=False, passthrough_unit=1)
    assert isinstance(step, Poll) and step.job.device.name == "a"
    schedule.poll_done(step, 0.505, answered=True, failed=False)
    assert schedule.next_step(0.505, port_open=True, writes_waiting=False, passthrough_unit=1) == ServePassthrough()


def test_pass_throughs_that_hold_the_line_long_leave_the_due_polls_their_rate() -> None:
    # Each client request takes a whole timeout (a unit that never answers it, or a long read on a slow line):
    # taking turns one for one, the third due poll would wait three of them (300 ms) and miss its 200 ms slot.
    schedule = line(*(device(f"d{u}", u, 0, poll=0.2) for u in (1, 2, 3)))
    task = BusyLineTask(schedule, passthrough=TIMEOUT)
    polls = task.run(20.0)
    for d in schedule.devices:
        assert d.stats.skipped_cycles == 0 and d.stats.cycles == 100, (d.name, d.stats)
        late = [at - p.due for at, p in polls if p.job.device is d]
        assert max(late) <= TIMEOUT + 2 * READ + 1e-9, (d.name, max(late))  # the request in progress, two polls
    # The client still gets what the polls leave: 20 s less their 1.5 s, in 100 ms requests.
    assert [kind for _, kind in task.steps].count("pass-through") == pytest.approx((20.0 - 300 * READ) / TIMEOUT, abs=2)


def test_a_slow_devices_pass_throughs_leave_the_due_polls_their_rate_and_fit_between_them() -> None:
    # Ten clients read a device that answers 80 ms late (within its 100 ms timeout) while three devices are
    # polled every 50 ms: each such read held longer than a poll interval. Shared half and half (or one for one)
    # the polls kept two thirds of their rate; the clients may take a twentieth of the line while polls are due.
    schedule = line(*(device(f"d{u}", u, 0, poll=0.05) for u in (1, 2, 3)))
    task = BusyLineTask(schedule, passthrough=0.08, takes=0.1)
    task.run(20.0)
    for d in schedule.devices:
        assert d.stats.cycles >= 0.9 * 400, (d.name, d.stats)
    served = [kind for _, kind in task.steps].count("pass-through")
    assert served >= 0.04 * 20.0 / 0.08  # the clients still get their share of the busy line


def test_a_pass_through_goes_between_polls_where_it_fits_and_waits_where_it_would_cost_a_slot() -> None:
    schedule = line(device("d", 1, 0, poll=0.1))
    schedule.start(0.0)
    poll = schedule.next_step(0.0, port_open=True, writes_waiting=False)
    assert isinstance(poll, Poll)
    schedule.poll_done(poll, 0.005, answered=True, failed=False)
    assert schedule.next_step(0.005, port_open=True, writes_waiting=False, passthrough_unit=9) == ServePassthrough()
    schedule.passthrough_done(0.025, 0.02)  # the clients' turn is spent until 0.025 + 9 x 0.02
    # The next poll is due at 0.1: one likely to take 90 ms fits (it ends by 0.1 + half the 100 ms interval) ...
    assert (
        schedule.next_step(0.03, port_open=True, writes_waiting=False, passthrough_unit=9, passthrough_takes=0.09)
        == ServePassthrough()
    )
    schedule.passthrough_done(0.1, 0.09)
    # ... one likely to take 160 ms would cost the next poll (due 0.2) its slot: the due poll goes first, and
    # after it the pass-through waits, the line idle until that poll.
    later = 0.1 + 9 * 0.09
    step = schedule.next_step(0.1, port_open=True, writes_waiting=False, passthrough_unit=9, passthrough_takes=0.16)
    assert isinstance(step, Poll)
    schedule.poll_done(step, 0.105, answered=True, failed=False)
    assert schedule.next_step(
        0.105, port_open=True, writes_waiting=False, passthrough_unit=9, passthrough_takes=0.16
    ) == Idle(0.2)
    # Once the clients' turn comes again it goes, fit or not.
    assert (
        schedule.next_step(later, port_open=True, writes_waiting=False, passthrough_unit=9, passthrough_takes=0.16)
        == ServePassthrough()
    )
