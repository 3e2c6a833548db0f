"""The gateway's view of its clock: is it synchronised, and has the wall clock stepped?

A Raspberry Pi has no real-time clock: it boots at the time it last saved and runs on it until NTP sets it,
often with a step of hours. Samples are stamped with the wall clock, so whoever reads them needs to know
whether that clock was right. `ClockSource` is the clock the gateway reads (wall time, monotonic time and the
sync state), injectable so that tests fake all three without touching the machine's clock. `ClockWatch` is a
supervised task that compares the two clocks every second, logs each step of the wall clock over STEP_MIN, and
logs when the clock gains or loses synchronisation; the snapshot's `clock` part reads what it saw.

Where the sync state comes from, in order (`SyncState.source`):
- `timesyncd`: systemd-timesyncd touches SYNCHRONIZED_FILE once it has set the clock from an NTP server, and
  the file lives in /run, so it is gone after a reboot until the next sync. It exists: synchronised.
- `kernel`: otherwise the kernel's own flag, read with adjtimex(2) (modes 0: read only, no privilege needed).
  Whatever disciplines the clock (chrony, ntpd, timesyncd) clears STA_UNSYNC in the status while it keeps the
  clock synchronised; the kernel sets it again when nobody has updated it for a while, and then adjtimex
  returns TIME_ERROR. Either means: not synchronised. (A container shares its host's kernel clock and flag.)
- `none`: neither could be read (no file and no adjtimex, e.g. not Linux): unknown, shown as such.

The gateway's watch keeps the process clock (`gateway.types.CLOCK`) up to date with the sync state: what is stamped
while it is not known synchronised carries an anchor, corrected when it is published (bridge/delivery.py).
`FIELDGATE_TEST_CLOCK` (tests only) names a file that fakes the whole process's clock: see `FileClock`.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.supervise import Supervised, Supervisor
from gateway.types import CLOCK, ProcessClock

log = logging.getLogger(__name__)

#: systemd-timesyncd's mark that it has synchronised the clock (systemd-timesyncd.service(8)).
SYNCHRONIZED_FILE = Path("/run/systemd/timesync/synchronized")
#: adjtimex(2): the status bit "clock not synchronised", and the return value that says the same.
STA_UNSYNC = 0x0040
TIME_ERROR = 5
#: A wall clock that moved this much more (or less) than the monotonic clock between two looks has stepped.
#: A slewing NTP client moves it by at most 0.5 ms a second, so nothing short of a step comes near.
STEP_MIN = 1.0
#: How often ClockWatch looks.
INTERVAL = 1.0


class Timex(ctypes.Structure):
    """`struct timex` of adjtimex(2) on 64-bit Linux (include/uapi/linux/timex.h; 208 bytes on x86-64 and arm64)."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),  # struct timeval time
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),  # the kernel's padding: it may write there
    ]


#: What adjtimex gives back: (its return value, the status word), or None when it cannot be called.
Adjtimex = Callable[[], "tuple[int, int] | None"]


@functools.cache
def _libc_adjtimex() -> Callable[..., int] | None:
    # Looked up once: the watcher asks every second.
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        call = ctypes.CDLL(name, use_errno=True).adjtimex
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.POINTER(Timex)]
    call.restype = ctypes.c_int
    return call


def kernel_adjtimex() -> tuple[int, int] | None:
    """Read (never set: modes 0) the kernel's clock state; None without a libc adjtimex or when the call fails."""
    call = _libc_adjtimex()
    if call is None:
        return None
    tx = Timex()  # zeroed: modes 0 reads only
    state = call(ctypes.byref(tx))
    if state < 0:
        return None
    return state, tx.status


@dataclass(frozen=True, slots=True)
class SyncState:
    """Whether the clock is synchronised (None: cannot tell), and who says so: timesyncd, kernel or none."""

    synchronized: bool | None
    source: str

    def describe(self) -> str:
        """For people and logs: `synchronised (timesyncd)`, `NOT synchronised (kernel)`, `unknown`."""
        if self.synchronized is None:
            return "unknown"
        return f"{'synchronised' if self.synchronized else 'NOT synchronised'} ({self.source})"


def read_sync_state(synchronized_file: Path = SYNCHRONIZED_FILE, adjtimex: Adjtimex = kernel_adjtimex) -> SyncState:
    """The clock's sync state now: timesyncd's file, else the kernel's adjtimex status, else unknown."""
    try:
        if synchronized_file.exists():
            return SyncState(True, "timesyncd")
    except OSError:  # a /run we may not look into: ask the kernel
        pass
    try:
        kernel = adjtimex()
    except Exception:  # a broken libc binding costs the answer, not the watcher
        log.debug("adjtimex could not be read", exc_info=True)
        kernel = None
    if kernel is None:
        return SyncState(None, "none")
    state, status = kernel
    return SyncState(state != TIME_ERROR and not status & STA_UNSYNC, "kernel")


@dataclass(frozen=True, slots=True)
class ClockSource:
    """The clock the gateway reads: wall time (unix s), monotonic time (s) and the sync state, each injectable."""

    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    sync: Callable[[], SyncState] = field(default=read_sync_state)


#: Tests only: the path of a JSON file `{"offset": seconds, "synchronized": true/false/null}` that fakes the clock of
#: a `fieldgate run` process (FileClock). Never set in a deployment: the gateway logs a warning when it is.
TEST_CLOCK_ENV = "FIELDGATE_TEST_CLOCK"


class FileClock:
    """A faked clock for a whole gateway in a test: the machine's wall clock moved by the file's `offset`, and the
    file's sync state; the file is read again whenever it changes (a test replaces it to step or sync the clock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._offset = 0.0
        self._synchronized: bool | None = None

    def _read(self) -> None:
        try:
            st = self.path.stat()
            key = (st.st_mtime_ns, st.st_ino, st.st_size)
            if key != self._seen:
                data = json.loads(self.path.read_text())
                self._offset = float(data.get("offset", 0.0))
                synced = data.get("synchronized")
                self._synchronized = synced if isinstance(synced, bool) else None
                self._seen = key
        except (OSError, ValueError, AttributeError):
            pass  # half written or gone: the last state read stands

    def wall(self) -> float:
        """The machine's wall clock plus the file's offset."""
        self._read()
        return time.time() + self._offset

    def sync(self) -> SyncState:
        """The file's sync state (source `test`)."""
        self._read()
        return SyncState(self._synchronized, "test" if self._synchronized is not None else "none")


def process_source() -> ClockSource:
    """The clock of the gateway process: the machine's, unless FIELDGATE_TEST_CLOCK names a fake one (tests)."""
    path = os.environ.get(TEST_CLOCK_ENV)
    if not path:
        return ClockSource()
    log.warning("clock faked from %s (%s is for tests only)", path, TEST_CLOCK_ENV)
    fake = FileClock(Path(path))
    return ClockSource(fake.wall, time.monotonic, fake.sync)


@dataclass(frozen=True, slots=True)
class ClockSnapshot:
    """What ClockWatch has seen: the sync state, the steps of the wall clock, the last one's size (s, + forward)."""

    synchronized: bool | None
    source: str
    steps: int
    last_step_s: float | None  # None: no step seen
    last_step_at_ms: int | None  # unix ms (after the step) when it was seen


class ClockWatch:
    """Looks at the clock every INTERVAL: logs and counts steps of the wall clock, logs sync state changes.

    `process`: the process clock it keeps the sync state of, made to read `source`. Without a `source` the watch is
    the gateway's: its source is `process_source()` and its process clock `gateway.types.CLOCK`. `on_change` is
    told the sync state at the first look and at each change of it (the gateway publishes it on P/status/clock).
    """

    def __init__(
        self,
        supervisor: Supervisor,
        source: ClockSource | None = None,
        *,
        step_min: float = STEP_MIN,
        interval: float = INTERVAL,
        process: ProcessClock | None = None,
        on_change: Callable[[SyncState], object] | None = None,
    ) -> None:
        self.supervisor = supervisor
        self.on_change = on_change
        if source is None:
            source, process = process_source(), process or CLOCK
        self.source = source
        self.process = process
        if process is not None:
            # Before anything is stamped: drivers, spools and outboxes read the process clock.
            process.wall, process.monotonic = source.wall, source.monotonic
            process.synchronized = source.sync().synchronized
        self.step_min = step_min
        self.interval = interval
        self.steps = 0
        self.last_step_s: float | None = None
        self.last_step_at_ms: int | None = None
        self.state: SyncState | None = None  # None: not looked yet
        self._last: tuple[float, float] | None = None  # (wall, monotonic) at the last look
        self._task: Supervised | None = None

    def start(self) -> None:
        """Look once now (so the first snapshot knows the state), then every INTERVAL under the supervisor."""
        self.check()
        self._task = self.supervisor.spawn("clock", self._run)

    async def stop(self) -> None:
        """Stop looking."""
        await self.supervisor.stop(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.check()

    def check(self) -> None:
        """One look: compare the wall clock's progress with the monotonic clock's since the last, and the sync state."""
        self._sync()  # first: an NTP client that steps the clock says so with the same move
        wall, mono = self.source.wall(), self.source.monotonic()
        if self._last is not None:
            # The loop may have been late: both clocks moved by as much, so only a step makes them differ.
            step = (wall - self._last[0]) - (mono - self._last[1])
            if abs(step) >= self.step_min:
                self.steps += 1
                self.last_step_s = step
                self.last_step_at_ms = int(wall * 1000)
                way = "forward" if step > 0 else "back"
                log.warning("wall clock stepped %s by %.1f s (clock %s)", way, abs(step), self._describe())
        self._last = (wall, mono)

    def _describe(self) -> str:
        return self.state.describe() if self.state is not None else "unknown"

    def _sync(self) -> None:
        state = self.source.sync()
        before, self.state = self.state, state
        if self.process is not None:
            self.process.synchronized = state.synchronized
        if before is not None and before.synchronized == state.synchronized:
            return
        if self.on_change is not None:
            try:
                self.on_change(state)
            except Exception:  # the watch keeps watching whatever its listener does
                log.exception("clock: telling the sync state failed")
        if state.synchronized:
            log.info("clock synchronised (%s)", state.source)
        elif state.synchronized is False:
            # At start-up too: samples are stamped with a time nobody has checked.
            lost = before is not None and before.synchronized
            log.warning(
                "clock %s (%s): samples carry this machine's unchecked time",
                "lost sync" if lost else "NOT synchronised",
                state.source,
            )
        elif before is not None:
            log.warning("clock sync state unknown now (was %s)", before.describe())
        else:
            log.info("clock sync state unknown: neither %s nor adjtimex could be read", SYNCHRONIZED_FILE)

    def snapshot(self) -> ClockSnapshot:
        """What the watch has seen so far (state unknown before its first look)."""
        state = self.state or SyncState(None, "none")
        return ClockSnapshot(state.synchronized, state.source, self.steps, self.last_step_s, self.last_step_at_ms)
