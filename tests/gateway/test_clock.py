"""The clock's sync state and the wall clock's steps, with a faked clock; one look through a real `fieldgate run`."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.clock import (
    STA_UNSYNC,
    TIME_ERROR,
    ClockSnapshot,
    ClockSource,
    ClockWatch,
    SyncState,
    Timex,
    kernel_adjtimex,
    read_sync_state,
)
from gateway.supervise import Supervisor

from configs import broker, config, write
from helpers import GatewayProcess, free_port, until

STA_NANO = 0x2000


def never(*_: object) -> tuple[int, int] | None:
    """An adjtimex that must not be asked."""
    raise AssertionError("adjtimex was asked although timesyncd's file says synchronised")


# --- where the sync state comes from ------------------------------------------------------------------------


def test_timesyncds_file_means_synchronised_without_asking_the_kernel(tmp_path: Path) -> None:
    """The file exists: synchronised, said by timesyncd, whatever the kernel would say."""
    mark = tmp_path / "synchronized"
    mark.touch()
    assert read_sync_state(mark, never) == SyncState(True, "timesyncd")


@pytest.mark.parametrize(
    ("kernel", "expected"),
    [
        ((0, STA_NANO), True),  # TIME_OK, STA_UNSYNC clear: an NTP client keeps it
        ((1, 0), True),  # TIME_INS (a leap second announced) is still synchronised
        ((0, STA_UNSYNC | STA_NANO), False),
        ((TIME_ERROR, 0), False),  # the kernel's return value says it alone
        ((TIME_ERROR, STA_UNSYNC | STA_NANO), False),  # as a machine nobody synchronised reads it
    ],
)
def test_without_the_file_the_kernels_adjtimex_status_decides(
    tmp_path: Path, kernel: tuple[int, int], expected: bool
) -> None:
    """No timesyncd file: the kernel's STA_UNSYNC bit and its TIME_ERROR return value say whether it is synchronised."""
    assert read_sync_state(tmp_path / "absent", lambda: kernel) == SyncState(expected, "kernel")


def test_neither_file_nor_adjtimex_is_unknown_and_a_broken_adjtimex_too(tmp_path: Path) -> None:
    """No file and no adjtimex (or one that raises): unknown, not a guess."""
    assert read_sync_state(tmp_path / "absent", lambda: None) == SyncState(None, "none")

    def broken() -> tuple[int, int] | None:
        raise OSError("no adjtimex here")

    assert read_sync_state(tmp_path / "absent", broken) == SyncState(None, "none")
    assert SyncState(None, "none").describe() == "unknown"
    assert SyncState(False, "kernel").describe() == "NOT synchronised (kernel)"


def test_struct_timex_has_the_kernels_64_bit_layout_and_the_real_call_reads_it() -> None:
    """The ctypes struct matches include/uapi/linux/timex.h on 64-bit Linux; this machine's kernel answers it."""
    assert ctypes.sizeof(ctypes.c_long) == 8  # the layout below is the 64-bit one
    assert ctypes.sizeof(Timex) == 208
    assert Timex.status.offset == 40 and Timex.tick.offset == 88 and Timex.tai.offset == 160
    kernel = kernel_adjtimex()
    assert kernel is not None
    state, status = kernel
    assert 0 <= state <= TIME_ERROR and status >= 0


# --- the watch ---------------------------------------------------------------------------------------------


class FakeClock:
    """Wall and monotonic time that the test moves, and a sync state it sets."""

    def __init__(self) -> None:
        self.wall = 1_700_000_000.0
        self.mono = 500.0
        self.state = SyncState(False, "kernel")
        self.looks = 0

    def tick(self, seconds: float = 1.0, *, wall: float | None = None) -> None:
        """Both clocks move by `seconds`; the wall clock by `wall` instead when given (a step or drift)."""
        self.mono += seconds
        self.wall += seconds if wall is None else wall

    def source(self) -> ClockSource:
        """The ClockSource that reads this fake."""
        return ClockSource(wall=lambda: self.wall, monotonic=lambda: self.mono, sync=self._sync)

    def _sync(self) -> SyncState:
        self.looks += 1
        return self.state


def steps_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The watch's step lines, in order."""
    return [r.getMessage() for r in caplog.records if "wall clock stepped" in r.getMessage()]


def test_steps_forward_and_back_are_logged_once_each_with_size_and_direction(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A step of an hour forward, then 5 s back: one WARNING each with its size; counted; the last one's size kept."""
    clock = FakeClock()
    watch = ClockWatch(Supervisor(), clock.source())
    caplog.set_level(logging.INFO, logger="gateway.clock")
    watch.check()
    clock.tick(wall=3601.2)  # 1 s passed, the wall clock moved 3601.2 s: an NTP step of 3600.2 s
    watch.check()
    clock.tick()
    watch.check()  # after the step the clocks move together again: not a second step
    clock.tick(wall=-4.0)
    watch.check()
    assert steps_logged(caplog) == [
        "wall clock stepped forward by 3600.2 s (clock NOT synchronised (kernel))",
        "wall clock stepped back by 5.0 s (clock NOT synchronised (kernel))",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records if "stepped" in r.getMessage())
    snap = watch.snapshot()
    assert snap.steps == 2 and snap.last_step_s == pytest.approx(-5.0)
    assert snap.last_step_at_ms == int(clock.wall * 1000)


def test_drift_under_a_second_and_a_late_loop_are_not_steps(caplog: pytest.LogCaptureFixture) -> None:
    """0.9 s off in one look, slewing, and a loop that looked 30 s late: no step logged or counted."""
    clock = FakeClock()
    watch = ClockWatch(Supervisor(), clock.source())
    watch.check()
    clock.tick(wall=1.9)  # 0.9 s more than the monotonic clock
    watch.check()
    for _ in range(100):  # a slewing NTP client: 0.5 ms a second, over 100 looks (50 ms in all)
        clock.tick(wall=1.0005)
        watch.check()
    clock.tick(30.0)  # the event loop was blocked for 30 s: both clocks moved as much
    watch.check()
    clock.tick(wall=0.1)  # 0.9 s back
    watch.check()
    assert steps_logged(caplog) == [] and watch.snapshot().steps == 0
    assert watch.snapshot().last_step_s is None


def test_sync_changes_are_logged_once_each_and_the_snapshot_follows(caplog: pytest.LogCaptureFixture) -> None:
    """Not synchronised at start (WARNING), synchronised (INFO), lost (WARNING), unknown: one line per change."""
    clock = FakeClock()
    watch = ClockWatch(Supervisor(), clock.source())
    caplog.set_level(logging.INFO, logger="gateway.clock")
    assert watch.snapshot() == ClockSnapshot(None, "none", 0, None, None)  # before its first look: unknown
    for state in [
        SyncState(False, "kernel"),
        SyncState(False, "kernel"),
        SyncState(True, "timesyncd"),
        SyncState(True, "timesyncd"),
        SyncState(True, "kernel"),  # another source, the same answer: not a change
        SyncState(False, "kernel"),
        SyncState(None, "none"),
    ]:
        clock.state = state
        clock.tick()
        watch.check()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "gateway.clock"]
    assert lines == [
        (logging.WARNING, "clock NOT synchronised (kernel): samples carry this machine's unchecked time"),
        (logging.INFO, "clock synchronised (timesyncd)"),
        (logging.WARNING, "clock lost sync (kernel): samples carry this machine's unchecked time"),
        (logging.WARNING, "clock sync state unknown now (was NOT synchronised (kernel))"),
    ]
    assert watch.snapshot() == ClockSnapshot(None, "none", 0, None, None)


def test_a_step_made_with_the_sync_is_logged_with_the_new_state(caplog: pytest.LogCaptureFixture) -> None:
    """NTP sets the clock and says synchronised in the same second: the step line names the new state."""
    clock = FakeClock()
    watch = ClockWatch(Supervisor(), clock.source())
    watch.check()
    clock.state = SyncState(True, "timesyncd")
    clock.tick(wall=-86_399.0)  # a day back: the Pi booted a day ahead of the real time
    watch.check()
    assert steps_logged(caplog) == ["wall clock stepped back by 86400.0 s (clock synchronised (timesyncd))"]


async def test_the_watch_runs_under_the_supervisor_and_stops() -> None:
    """start() looks at once and then keeps looking as the supervised task `clock`; stop() ends it."""
    clock = FakeClock()
    supervisor = Supervisor()
    watch = ClockWatch(supervisor, clock.source(), interval=0.01)
    watch.start()
    assert clock.looks == 1 and watch.snapshot().synchronized is False  # known before the first interval
    assert [t.name for t in supervisor.tasks] == ["clock"]
    clock.wall += 7200.0
    await until(lambda: watch.snapshot().steps == 1)
    await watch.stop()
    assert supervisor.tasks == []
    looks = clock.looks
    await asyncio.sleep(0.05)
    assert clock.looks == looks


# --- through a real gateway process ---------------------------------------------------------------------------


async def test_a_running_gateway_shows_this_machines_clock_state_on_metrics_and_the_page(tmp_path: Path) -> None:
    """`fieldgate run`: /metrics has fieldgate_clock_* as this machine reads its sync state; the page its line."""
    http = free_port()
    path = write(config(http=f"127.0.0.1:{http}", broker=broker(free_port(), process="inline")), tmp_path)
    expected = read_sync_state()
    with GatewayProcess(["run", "-c", str(path)], tmp_path / "gw.log", cwd=tmp_path) as gw:
        await gw.logged(" up: ")

        def fetch(route: str) -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}{route}", timeout=5) as resp:
                return str(resp.read().decode())

        metrics = await asyncio.to_thread(fetch, "/metrics")
        page = await asyncio.to_thread(fetch, "/")
        assert gw.stop() == 0
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}
    assert samples["fieldgate_clock_steps_total"] == 0
    if expected.synchronized is None:
        assert "fieldgate_clock_synchronized" not in samples
    else:
        assert samples["fieldgate_clock_synchronized"] == (1 if expected.synchronized else 0)
    word = {None: "unknown", True: "synchronised", False: "NOT synchronised"}[expected.synchronized]
    assert '<p id="clock">clock: <span' in page and word in page.split('id="clock"')[1].split("</p>")[0]
