"""Fixtures for the HIL tests: the rigs of hil/scenarios.py (a ModbusBus and pymodbus slaves joined by
the baud-accurate line), stopped at the end of each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from hil.scenarios import Rig, Rigs

RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rigs(tmp_path: Path) -> AsyncIterator[Rigs]:
    """Virtual rigs in this test's directory; whatever a test leaves running is stopped."""
    async with Rigs(tmp_path) as r:
        yield r


@pytest.fixture
async def make_rig(rigs: Rigs) -> RigFactory:
    """Build line + slaves (constant known values) + bus from a devices YAML: `Rigs.build`."""
    return rigs.build
