"""Fixtures of the hostile-input tests: every test talks to a real `fieldgate run` process over real sockets.

`FG_SECURITY_GATEWAY_ROOT` runs the gateway from another source tree (an export of an older commit, say),
so that the same tests can be seen failing against code without the fixes.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

# The tests import their shared parts from hostile.py next to this file (tests/ itself is on the path already).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hostile import StartGateway, gateway_starter  # noqa: E402


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    """`await start_gateway(mcp={...}, upstream=mosquitto, broker={...})`: a running gateway, stopped at the end."""
    async with gateway_starter(tmp_path) as start:
        yield start
