"""Fixtures that build real parts: an amqtt broker on a free port, a paho subscriber."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

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
async def subscriber(broker: EmbeddedBroker, port: int) -> AsyncIterator[Subscriber]:
    """A paho subscriber to everything on the test broker (connected off the loop the broker runs on)."""
    sub = Subscriber(port)
    await asyncio.to_thread(sub.start)
    try:
        yield sub
    finally:
        sub.stop()
