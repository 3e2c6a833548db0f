"""Fixtures that build real parts: an amqtt broker on a free port, a paho subscriber, a Mosquitto process.

Under CI (`CI=true` in the environment) no test may skip: a skip for lack of root, a mount or a tool is
reported as a failure with its reason, so that CI can never pass on skips. An expected failure (xfail)
stays what it is.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest

from bridge import statefiles
from bridge.broker import EmbeddedBroker
from gateway.types import CLOCK

from helpers import Subscriber, free_port
from mosquitto import Mosquitto, MosquittoError, TlsFiles, make_tls_files


@pytest.fixture(autouse=True)
def corrupt_files_counted_per_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """The damaged-state-file counters are process-wide: each test counts from zero, whatever ran before it."""
    monkeypatch.setattr(statefiles, "_counts", dict.fromkeys(statefiles.FILES, 0))


@pytest.fixture(autouse=True)
def process_clock_per_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process clock (gateway.types.CLOCK) is process-wide and a gateway run in a test's process sets its sync
    state from the machine (here: not synchronised): each test starts from an unknown state and a fresh offset."""
    monkeypatch.setattr(CLOCK, "synchronized", None)
    monkeypatch.setattr(CLOCK, "_offset", None)


def in_ci() -> bool:
    """Whether the suite runs under CI (`CI=true`, as CI services set it), where nothing may skip."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _fail_the_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not (in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    # A skip's longrepr is (file, line, "Skipped: reason").
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, where nothing may skip: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, object, object]:
    """Under CI, a test that skipped (in set-up, call or a skipif mark) fails instead, with the skip's reason."""
    report = yield
    assert isinstance(report, pytest.TestReport)
    _fail_the_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, object, object]:
    """Under CI, a module that skipped as a whole (importorskip, allow_module_level) is a collection error."""
    report = yield
    assert isinstance(report, pytest.CollectReport)
    _fail_the_skip(report)
    return report


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
