"""The silence an RTU line keeps between frames (t3.5, or the configured inter-request delay), timed precisely."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

#: Silences shorter than this (t3.5 from 9600 baud up) are timed by a thread of the line's own:
#: asyncio's epoll wait rounds a timeout up to whole milliseconds, which stretches the 1.75 ms t3.5 of
#: a fast line to 2-3 ms, a tenth of its capacity. time.sleep in a thread is not rounded.
PRECISE_WAIT = 0.005


class QuietGap:
    """The silence kept on one line from the last byte of a frame to the next request."""

    def __init__(self, seconds: float, line: str) -> None:
        self.seconds = seconds
        #: Monotonic time the line last went quiet (the last byte of an answer, or a request's end).
        self.last_end = 0.0
        self._line = line
        self._timer: ThreadPoolExecutor | None = None  # for the short silences: see PRECISE_WAIT

    async def wait(self) -> bool:
        """Wait until the silence since `last_end` is long enough; True if that took a wait."""
        # Real RS-485 slaves need silence between frames; pymodbus does not enforce it.
        end = self.last_end + self.seconds
        wait = end - time.monotonic()
        if wait <= 0:
            return False
        if wait < PRECISE_WAIT:
            if self._timer is None:
                self._timer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"modbus-gap-{self._line}")
            await asyncio.get_running_loop().run_in_executor(self._timer, _sleep_until, end)
        else:
            await asyncio.sleep(wait)
        return True

    def close(self) -> None:
        """Let the precise timer's thread go (a later wait starts a new one)."""
        if self._timer is not None:
            self._timer.shutdown(wait=False)
            self._timer = None


def _sleep_until(end: float) -> None:
    """Block until time.monotonic() reaches `end`, to the tens of microseconds (a worker thread's wait)."""
    wait = end - time.monotonic()
    if wait > 0:
        time.sleep(wait)
