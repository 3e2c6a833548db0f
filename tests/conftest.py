"""Fixtures that build real parts: an amqtt broker on a free port, a paho subscriber."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from bridge.broker import EmbeddedBroker
from helpers import Subscriber, free_port


@pytest.fixture
def port() -> int:
    """A free loopback port."""
    return free_port()


@pytest.fixture
async def broker(port: int) -> AsyncIterator[EmbeddedBroker]:
    """An embedded amqtt broker on a free loopback port."""
    b = EmbeddedBroker([f"tcp://127.0.0.1:{port}"])
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


@pytest.fixture
def subscriber(broker: EmbeddedBroker, port: int) -> Iterator[Subscriber]:
    """A paho subscriber to everything on the test broker."""
    sub = Subscriber(port)
    sub.start()
    try:
        yield sub
    finally:
        sub.stop()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary folder that is also the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
