"""Driver events on their way to the router, held back in order while a reload swaps the parts they would meet."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

from gateway.router import Router
from gateway.types import DeviceState, Sample


class EventGate:
    """Hands samples, MCP deliveries and device states to the router; while a reload swaps parts they wait, in order."""

    def __init__(self, router: Callable[[], Router | None]) -> None:
        self._router = router
        self._waiting: list[Callable[[], None]] | None = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold every event back for the duration; on leaving (even by an exception) they go on, in order."""
        self._waiting = []
        try:
            yield
        finally:
            waiting, self._waiting = self._waiting, None
            for event in waiting:
                event()

    def on_sample(self, sample: Sample) -> None:
        """A Modbus line's sample."""
        if self._waiting is not None:
            self._waiting.append(functools.partial(self.on_sample, sample))
            return
        self._live().on_sample(sample)

    def deliver(self, sample: Sample) -> asyncio.Future[Any]:
        """An MCP DATA frame's sample; the future resolves once every sink holds it durably."""
        if self._waiting is not None:
            # The MCP ACK waits for the swap too: it still means "durable on every sink".
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._waiting.append(functools.partial(self._deliver_later, sample, fut))
            return fut
        return self._live().deliver(sample)

    def _deliver_later(self, sample: Sample, fut: asyncio.Future[Any]) -> None:
        def settle(done: asyncio.Future[Any]) -> None:
            if fut.done():
                return
            if done.cancelled():
                fut.cancel()
            elif (exc := done.exception()) is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(done.result())

        self.deliver(sample).add_done_callback(settle)

    def on_state(self, state: DeviceState) -> None:
        """A device went online or offline."""
        if self._waiting is not None:
            self._waiting.append(functools.partial(self.on_state, state))
            return
        self._live().on_state(state)

    def _live(self) -> Router:
        router = self._router()
        assert router is not None, "a driver event before the router was built"
        return router
