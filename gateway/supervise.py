"""One supervisor for every long-lived task: a failure is logged with its traceback, restarted with back-off, reported.

It imports nothing but the standard library, so `bridge/` may take a Supervisor as it takes `gateway.errors`
(the sinks and the broker process are handed the gateway's own one; alone, e.g. in a test, they make one).
A task is restarted after 1 s, then 2, 4 ... up to 60 s while it keeps failing; once it has run for a minute
without failing the next failure waits 1 s again. While a task is in back-off, `problems()` names it, so
`/healthz` answers 503; the systemd watchdog stops pinging only for a task that keeps failing
(`problems(lasting=True)`: LASTING_FAILURES in a row without a healthy minute), not for one the restart fixes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: Makes a fresh coroutine of the task's work, once per (re)start.
Work = Callable[[], Coroutine[Any, Any, None]]

RESTART_MIN = 1.0
RESTART_MAX = 60.0
#: A task that ran this long before failing is restarted after RESTART_MIN again.
HEALTHY_AFTER = 60.0
#: Failures in a row (no healthy minute between) after which a task in back-off is a lasting problem, one the
#: systemd watchdog acts on. The restarts wait 1, 2, 4 s first: a fault that three prompt restarts (some 7 s
#: of trying) did not cure is not transient, and restarting the whole gateway (Modbus and MCP down for
#: seconds) is the next step. A rule of time down (e.g. longer than WatchdogSec / 2) would miss a task that
#: fails at once after every restart and so is down for only a growing back-off at a time; counting failures
#: catches it, and the doubling back-off keeps the count's meaning in time (4 in a row take at least 7 s).
#: With the unit's WatchdogSec=30, such a task has the gateway restarted some 40 s after its first failure.
LASTING_FAILURES = 4


@dataclass(eq=False)
class Supervised:
    """One supervised task: its name, its current asyncio task, and how it has failed."""

    name: str
    work: Work
    task: asyncio.Task[None] | None = None
    started: float = 0.0
    delay: float = 0.0  # the back-off of the next restart (0: none failed yet, or healthy since)
    failures: int = 0
    streak: int = 0  # failures in a row, without a healthy spell (HEALTHY_AFTER) between them
    why: str | None = None  # the last failure, while in back-off
    restart_at: float | None = None  # while in back-off
    timer: asyncio.TimerHandle | None = None
    stopped: bool = False


class Supervisor:
    """Runs long-lived tasks, restarts those that fail with back-off, and says which are down (`problems`)."""

    def __init__(
        self,
        *,
        restart_min: float = RESTART_MIN,
        restart_max: float = RESTART_MAX,
        healthy_after: float = HEALTHY_AFTER,
        lasting_failures: int = LASTING_FAILURES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.restart_min = restart_min
        self.restart_max = restart_max
        self.healthy_after = healthy_after
        self.lasting_failures = lasting_failures
        self._clock = clock
        self._tasks: list[Supervised] = []

    def spawn(self, name: str, work: Work) -> Supervised:
        """Start `work()` as the task `name` (its asyncio name too); whenever it ends unasked, start it again."""
        entry = Supervised(name, work)
        self._tasks.append(entry)
        self._start(entry)
        return entry

    async def stop(self, *entries: Supervised | None) -> None:
        """Cancel these tasks (all, when none is given) and wait for them; they are not restarted."""
        chosen = [e for e in entries if e is not None] if entries else list(self._tasks)
        for entry in chosen:
            entry.stopped = True
            if entry.timer is not None:
                entry.timer.cancel()
            if entry.task is not None:
                entry.task.cancel()
        for entry in chosen:
            if entry.task is not None:
                # Its own failure was logged already (or it is ours to stop): only wait for it to go.
                await asyncio.wait([entry.task])
            if entry in self._tasks:
                self._tasks.remove(entry)

    @property
    def tasks(self) -> list[Supervised]:
        """The tasks supervised now (running or in back-off)."""
        return list(self._tasks)

    def problems(self, entries: Iterable[Supervised] | None = None, *, lasting: bool = False) -> list[str]:
        """`task <name>: ...` for every task (of `entries`, when given) that failed and waits for its restart;
        with `lasting`, only those that failed `lasting_failures` times in a row (what the watchdog acts on)."""
        now = self._clock()
        out = []
        for entry in self._tasks if entries is None else entries:
            if entry.stopped or entry.restart_at is None:
                continue
            if lasting and entry.streak < self.lasting_failures:
                continue
            wait = max(0.0, entry.restart_at - now)
            out.append(f"task {entry.name}: {entry.why}; restart {entry.failures} in {wait:.1f} s")
        return out

    def running(self, name: str) -> asyncio.Task[None] | None:
        """The asyncio task that runs `name` now (None while in back-off)."""
        for entry in self._tasks:
            if entry.name == name and entry.task is not None and not entry.task.done():
                return entry.task
        return None

    # --- inside -----------------------------------------------------------------------------------

    def _start(self, entry: Supervised) -> None:
        entry.timer = None
        if entry.stopped:
            return
        entry.started = self._clock()
        try:
            entry.task = asyncio.get_running_loop().create_task(entry.work(), name=entry.name)
        except Exception as exc:  # the work could not even be made: the same back-off as a failure
            entry.task = None
            self._failed(entry, f"cannot start: {exc!r}", exc)
            return
        entry.restart_at = entry.why = None
        entry.task.add_done_callback(lambda task: self._ended(entry, task))

    def _ended(self, entry: Supervised, task: asyncio.Task[None]) -> None:
        if entry.stopped or task is not entry.task:
            return
        if task.cancelled():
            # Nobody asked (stop() marks the entry first): the same as a crash, without a traceback to show.
            self._failed(entry, "cancelled", None)
        elif (exc := task.exception()) is not None:
            self._failed(entry, f"failed: {exc!r}", exc)
        else:
            self._failed(entry, "ended", None)

    def _failed(self, entry: Supervised, why: str, exc: BaseException | None) -> None:
        now = self._clock()
        healthy = entry.failures == 0 or now - entry.started >= self.healthy_after
        entry.delay = self.restart_min if healthy else min(entry.delay * 2, self.restart_max)
        entry.failures += 1
        entry.streak = 1 if healthy else entry.streak + 1
        entry.why = why[:300]
        entry.restart_at = now + entry.delay
        log.error("task %s %s; restarting it in %.1f s", entry.name, why, entry.delay, exc_info=exc if exc else None)
        entry.timer = asyncio.get_running_loop().call_later(entry.delay, self._start, entry)
