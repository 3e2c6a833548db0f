"""Virtual MCP devices: an MCP client that pushes wave values and answers two demo commands."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from typing import Any

from drivers.mcp.client import McpClient, McpClientError
from drivers.sim.waves import Wave
from gateway.types import Value

log = logging.getLogger(__name__)


class McpSimDevice:
    """Sends its values every `interval` seconds over MCP; `set` and `ping` commands change or echo them."""

    def __init__(
        self,
        host: str,
        port: int,
        device_id: str,
        token: str,
        *,
        interval: float,
        waves: dict[str, Wave],
        **kw: Any,
    ) -> None:
        self.device_id = device_id
        self.interval = interval
        self.waves = waves
        self.held: dict[str, Value] = {}
        self.client = McpClient(host, port, device_id, token, on_command=self._command, **kw)
        self._task: asyncio.Task[None] | None = None

    def values(self, t: float) -> dict[str, Value]:
        """What the device reports at unix time `t`."""
        # Rounded as a sensor would report them: no 15-digit noise on the dashboard.
        out = {name: _rounded(wave.at(t, zlib.crc32(name.encode()))) for name, wave in self.waves.items()}
        out.update(self.held)
        return out

    async def start(self) -> None:
        """Connect and start pushing."""
        await self.client.start()
        self._task = asyncio.create_task(self._push(), name=f"sim-mcp:{self.device_id}")

    async def stop(self) -> None:
        """Stop pushing and disconnect."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.stop()

    async def _push(self) -> None:
        next_at = time.monotonic()
        while True:
            now = time.time()
            try:
                await self.client.send(self.values(now), ts=int(now * 1000))
            except McpClientError as exc:
                log.debug("simulated %s: %s", self.device_id, exc)
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def _command(self, name: str, args: dict[str, Any]) -> Any:
        if name == "ping":
            return {"pong": args}
        if name == "set":
            unknown = [k for k in args if k not in self.waves and k not in self.held]
            if unknown:
                raise ValueError(f"no value named {', '.join(unknown)}")
            self.held.update(args)
            return dict(self.held)
        raise ValueError(f"unknown command {name!r} (try ping or set)")


def _rounded(value: Value) -> Value:
    return round(value, 3) if isinstance(value, float) else value
