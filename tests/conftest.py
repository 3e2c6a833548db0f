"""Fixtures that build real parts: an amqtt broker on a free port, a paho subscriber, a Mosquitto process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bridge.broker import EmbeddedBroker

from helpers import Subscriber, free_port
from mosquitto import Mosquitto, MosquittoError, TlsFiles, make_tls_files


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


def _mosquitto(workdir: Path, tls: TlsFiles | None = None) -> Mosquitto:
    try:
        return Mosquitto(workdir, free_port(), tls=tls)
    except MosquittoError as exc:
        # Fail, not skip: a store-and-forward test that silently skips proves nothing.
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running Mosquitto on its own free loopback port (not `port`); stopped afterwards even if the test killed it."""
    m = _mosquitto(tmp_path / "mosquitto")
    m.start()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def mosquitto_tls(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running Mosquitto with a TLS listener that requires a client certificate; the PEM files are `.tls`."""
    m = _mosquitto(tmp_path / "mosquitto-tls", tls=make_tls_files(tmp_path / "tls"))
    m.start()
    try:
        yield m
    finally:
        m.stop()
