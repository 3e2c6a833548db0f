"""The supervisor: failures logged and restarted with back-off; on a running gateway, every long-lived task of its
own comes back after an injected failure, and /healthz says so while it is down."""

from __future__ import annotations

import ast
import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import gateway.app
import gateway.http
import gateway.supervise
import gateway.systemd
from bridge import broker_process
from gateway.app import Gateway
from gateway.config import load_config
from gateway.supervise import Supervisor

from configs import Section, broker, config, device, line, point, sim_line, sim_slave, simulator, write
from helpers import Subscriber, free_port, until

# --- the supervisor alone -----------------------------------------------------------------------------


class Boom(RuntimeError):
    """The injected failure."""


async def test_a_failing_task_is_logged_restarted_with_doubling_back_off_and_listed_meanwhile(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sup = Supervisor(restart_min=0.05, restart_max=0.2, healthy_after=10.0)
    starts: list[float] = []

    async def work() -> None:
        starts.append(time.monotonic())
        raise Boom(f"failure {len(starts)}")

    sup.spawn("flaky", work)
    await until(lambda: len(starts) >= 5 and sup.problems(), 5)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    # 0.05, 0.1, 0.2, then capped at 0.2 (timers may run a little late, never early).
    for gap, want in zip(gaps, (0.05, 0.1, 0.2, 0.2), strict=False):
        assert want <= gap < want + 0.25, gaps
    (problem,) = sup.problems()
    assert problem.startswith("task flaky: failed: Boom('failure ") and "restart" in problem
    errors = [r for r in caplog.records if r.name == "gateway.supervise" and r.levelno == logging.ERROR]
    assert len(errors) >= 4 and errors[0].exc_info is not None and errors[0].exc_info[0] is Boom
    assert "task flaky failed: Boom('failure 1')" in errors[0].getMessage()
    await sup.stop()
    assert sup.problems() == [] and sup.tasks == []


async def test_the_back_off_starts_again_after_a_healthy_spell_and_a_running_task_is_no_problem() -> None:
    sup = Supervisor(restart_min=0.05, restart_max=1.0, healthy_after=0.3)
    runs: list[float] = []
    fail_after = [0.0, 0.0, 0.0, 0.4, 0.0]  # three quick failures, one after a healthy spell, one quick again

    async def work() -> None:
        runs.append(time.monotonic())
        await asyncio.sleep(fail_after[min(len(runs) - 1, len(fail_after) - 1)])
        if len(runs) <= len(fail_after):
            raise Boom("again")
        await asyncio.sleep(3600)

    sup.spawn("w", work)
    await until(lambda: len(runs) >= 6, 5)
    assert sup.problems() == [] and sup.running("w") is not None
    # 0.05, 0.1, 0.2, then 0.4 s of health resets it: 0.05 again (not 0.4), then 0.1.
    waits = [runs[1] - runs[0], runs[2] - runs[1], runs[3] - runs[2], runs[4] - runs[3] - 0.4, runs[5] - runs[4]]
    for got, want in zip(waits, (0.05, 0.1, 0.2, 0.05, 0.1), strict=True):
        assert want <= got < want + 0.25, waits
    await sup.stop()


async def test_a_task_cancelled_from_outside_or_that_returns_is_restarted_but_stop_ends_it_for_good() -> None:
    sup = Supervisor(restart_min=0.05)
    starts = 0

    async def work() -> None:
        nonlocal starts
        starts += 1
        if starts == 2:
            return  # a long-lived loop that ends is as wrong as one that raises
        await asyncio.sleep(3600)

    entry = sup.spawn("loop", work)
    await until(lambda: starts == 1, 5)
    first = sup.running("loop")
    assert first is not None and first.get_name() == "loop"
    first.cancel()
    await until(lambda: sup.problems(), 5, "the cancelled task listed")
    assert sup.problems()[0].startswith("task loop: cancelled")
    await until(lambda: starts == 3 and sup.running("loop"), 5, "restarted twice")
    assert entry.failures == 2
    await sup.stop(entry)
    await asyncio.sleep(0.15)
    assert starts == 3 and sup.running("loop") is None and sup.problems() == []


async def test_a_task_is_a_lasting_problem_only_after_failing_again_and_again_without_a_healthy_spell() -> None:
    sup = Supervisor(restart_min=0.05, restart_max=0.1, healthy_after=0.3, lasting_failures=3)
    runs = 0
    healthy = asyncio.Event()

    async def work() -> None:
        nonlocal runs
        runs += 1
        if healthy.is_set():
            await asyncio.sleep(0.4)  # a healthy spell, then one failure more
        raise Boom(f"failure {runs}")

    entry = sup.spawn("w", work)
    await until(lambda: runs == 1 and sup.problems(), 5)
    assert sup.problems(lasting=True) == []  # one failure: the supervisor's to fix
    await until(lambda: runs == 3 and sup.problems(), 5, "the third failure")
    assert entry.streak == 3
    (problem,) = sup.problems(lasting=True)
    assert problem.startswith("task w: failed: Boom('failure 3')")
    assert sup.problems([]) == [] and sup.problems([entry]) == sup.problems()
    healthy.set()
    started = runs
    await until(lambda: runs == started + 1 and sup.running("w"), 5, "a healthy run")
    await until(lambda: sup.problems(), 2, "its failure after the healthy spell")
    assert entry.streak == 1 and sup.problems(lasting=True) == []
    await sup.stop()


def test_the_supervisor_imports_nothing_of_the_project() -> None:
    # bridge/ takes a Supervisor: it must stay a bottom module, like gateway.errors.
    tree = ast.parse(Path(gateway.supervise.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] in ("gateway", "bridge", "drivers")}, imported


# --- every supervised task of a running gateway ------------------------------------------------------


def supervised_config(http: int, mqtt: int) -> Section:
    """One plc on a simulated line, the broker in a child process, the status page on `http`."""
    plc = device("plc", 1, poll="200ms", points=[point("count", "holding", 0, "uint16")])
    return config(
        id="sv",
        http=f"127.0.0.1:{http}",
        broker=broker(mqtt, process="separate"),
        buses=[line("line", "./ttyA", plc)],
        simulator=simulator(modbus=[sim_line("./ttyA", sim_slave(1))]),
    )


class Supervised:
    """A running gateway (broker in a child process, status page, systemd notify socket) and an HTTP client."""

    def __init__(self, gw: Gateway, url: str, http: aiohttp.ClientSession, notify: socket.socket) -> None:
        self.gw = gw
        self.url = url
        self.http = http
        self.notify = notify

    async def healthz(self) -> tuple[int, str]:
        """/healthz: status and body."""
        async with self.http.get(self.url + "/healthz") as resp:
            return resp.status, await resp.text()

    def datagrams(self) -> list[bytes]:
        """What reached the notify socket since the last call."""
        out = []
        while True:
            try:
                out.append(self.notify.recv(4096))
            except BlockingIOError:
                return out


@pytest.fixture
async def supervised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Supervised]:
    """The gateway, with its loops' periods short enough to fail and recover within a test."""
    monkeypatch.setattr(gateway.app, "METRICS_INTERVAL", 0.1)
    monkeypatch.setattr(gateway.http, "UTILISATION_SAMPLE", 0.1)
    monkeypatch.setattr(gateway.systemd, "STATUS_INTERVAL", 0.1)
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    http, mqtt = free_port(), free_port()
    path = write(supervised_config(http, mqtt), tmp_path)
    gw = Gateway(load_config(path))
    gw.supervisor.restart_min = 0.5  # the default 1 s works the same, only slower
    await gw.start()
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    try:
        assert await gw.sinks[0].wait_connected(10)
        yield Supervised(gw, f"http://127.0.0.1:{http}", session, notify)
    finally:
        await session.close()
        await gw.stop()
        notify.close()


def once(fail: Callable[..., Any]) -> Callable[..., Any]:
    """`fail`'s behaviour replaced by raising Boom the first time it is called."""
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Boom("injected")
        return fail(*args, **kwargs)

    return wrapper


async def test_every_supervised_task_shows_in_healthz_after_a_failure_and_comes_back(
    supervised: Supervised, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw, sup = supervised.gw, supervised.gw.supervisor
    sink = gw.sinks[0]
    assert gw.http is not None and isinstance(gw.broker, broker_process.BrokerProcess)
    assert await supervised.healthz() == (200, "ok\n")
    names = {e.name for e in sup.tasks}
    assert names >= {"sink:local:connect", "sink:local:misc", "broker-process", "metrics", "reload"}
    assert names >= {"http:utilisation", "systemd:status"}
    assert names >= {f"outbox:local:{loop}" for loop in ("live", "commit", "replay", "housekeeping")}
    old_pid = gw.broker.pid

    async def inject_connect() -> None:
        monkeypatch.setattr(sink, "_connected_or_dropped", once(sink._connected_or_dropped))
        sock = sink._client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)

    async def inject_broker() -> None:
        # The child dies, and starting the next one fails once the way a full process table would.
        real = asyncio.create_subprocess_exec

        async def exec_fails_once(*args: Any, **kwargs: Any) -> Any:
            monkeypatch.setattr(broker_process.asyncio, "create_subprocess_exec", real)
            raise OSError(12, "Cannot allocate memory")

        monkeypatch.setattr(broker_process.asyncio, "create_subprocess_exec", exec_fails_once)
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)

    async def inject_reload() -> None:
        monkeypatch.setattr(gw, "reload", once(gw.reload))
        gw.request_reload()

    async def inject(target: object, attr: str) -> None:
        monkeypatch.setattr(target, attr, once(getattr(target, attr)))

    injections: dict[str, Callable[[], Any]] = {
        "metrics": lambda: inject(gw, "metrics"),
        "http:utilisation": lambda: inject(gw.http.utilisation, "sample"),  # type: ignore[union-attr]
        "systemd:status": lambda: inject(gateway.systemd, "status_line"),
        "sink:local:misc": lambda: inject(sink._client, "loop_misc"),
        "sink:local:connect": inject_connect,
        "broker-process": inject_broker,
        "reload": inject_reload,
    }
    for name, injection in injections.items():
        before = next(e for e in sup.tasks if e.name == name).failures
        await injection()

        async def listed(n: str = name) -> str | None:
            status, body = await supervised.healthz()
            failure = "failed: OSError(12, " if n == "broker-process" else "failed: Boom('injected')"
            return body if status == 503 and f"task {n}: {failure}" in body else None

        # The broker child's death is a failure of its watcher too; the failed start is the second.
        failures = before + (2 if name == "broker-process" else 1)

        async def back(n: str = name, want: int = failures) -> bool:
            entry = next(e for e in sup.tasks if e.name == n)
            return entry.failures == want and sup.running(n) is not None and (await supervised.healthz())[0] == 200

        deadline = time.monotonic() + 10
        while not (body := await listed()):
            assert time.monotonic() < deadline, f"{name}: never listed in /healthz"
            await asyncio.sleep(0.02)
        assert f"restart {failures} in" in body, body
        while not await back():
            assert time.monotonic() < deadline, f"{name}: did not come back: {await supervised.healthz()}"
            await asyncio.sleep(0.05)

    # And they work again: the broker child is a new one and serves; the sink is connected to it; metrics,
    # samples and STATUS lines flow; a reload is carried out.
    await until(lambda: gw.broker.pid not in (None, old_pid), 10, "a new broker child")  # type: ignore[union-attr]
    assert await sink.wait_connected(10)
    sub = Subscriber(int(gw.cfg.broker.listeners[0].rsplit(":", 1)[1]), ("fieldgate/sv/metrics",))
    await asyncio.to_thread(sub.start)
    try:
        await sub.next_on("fieldgate/sv/metrics", timeout=5)
    finally:
        sub.stop()
    supervised.datagrams()
    await until(lambda: any(b"STATUS=" in d for d in supervised.datagrams()), 5, "a STATUS line")
    assert await gw.reload() is True
