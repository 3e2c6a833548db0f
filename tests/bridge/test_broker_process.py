"""The embedded broker in a child process: start, serve, survive its own death, die with the gateway."""

from __future__ import annotations

import asyncio
import functools
import operator
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from bridge.broker_process import BrokerProcess
from bridge.broker_users import LOGIN_FAILURES
from bridge.sink import MqttSink
from gateway.errors import FieldgateError
from gateway.supervise import Supervisor
from gateway.types import Message

from helpers import Subscriber, free_port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): look at its state.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


async def test_serves_and_comes_back_after_it_dies() -> None:
    port = free_port()
    broker = BrokerProcess([f"tcp://127.0.0.1:{port}"])
    await broker.start()
    sub = Subscriber(port, ("p/#",))
    await asyncio.to_thread(sub.start)
    sink = MqttSink("t", f"mqtt://127.0.0.1:{port}", "p", client_id="proc-test")
    await sink.start()
    try:
        assert await sink.wait_connected(5)
        await sink.publish(Message("x", b"1"))
        await sub.next_on("p/x")
        first = broker.pid
        assert first is not None and first != os.getpid()
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (broker.pid in (None, first)) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert broker.restarts == 1 and broker.pid not in (None, first)
        # The sink reconnects to the new broker by itself and publishing goes on.
        await asyncio.wait_for(sink.publish(Message("y", b"2")), 15)
    finally:
        sub.stop()
        await sink.stop()
        await broker.stop()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # stopped: nothing listens any more


async def test_a_child_that_cannot_be_started_again_is_a_problem_until_it_can(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    supervisor = Supervisor(restart_min=0.2, restart_max=0.4)
    broker = BrokerProcess([f"tcp://127.0.0.1:{port}"], supervisor=supervisor)
    await broker.start()
    taken = socket.socket()
    try:
        first = broker.pid
        assert first is not None and supervisor.problems() == []
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _alive(first):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        # Someone else takes the port: every start of a new child fails ("address already in use").
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen()
        deadline = time.monotonic() + 20
        while not any("already in use" in p for p in supervisor.problems()):
            assert time.monotonic() < deadline, (
                f"a broker that cannot start was never reported: {supervisor.problems()}"
            )
            await asyncio.sleep(0.05)
        (problem,) = supervisor.problems()
        assert problem.startswith("task broker-process: failed: FieldgateError(") and broker.pid is None
        taken.close()  # the port is free again: the next start brings the broker back
        deadline = time.monotonic() + 20
        while broker.pid is None or supervisor.problems():
            assert time.monotonic() < deadline, f"the broker never came back: {supervisor.problems()}"
            await asyncio.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        assert broker.restarts == 1 and broker.pid != first
    finally:
        taken.close()
        await broker.stop()
    starts = [r.getMessage() for r in caplog.records if r.name == "gateway.supervise"]
    assert any("exited" in m for m in starts) and any("already in use" in m for m in starts)


async def test_a_port_in_use_is_one_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = BrokerProcess([f"tcp://127.0.0.1:{port}"])
        with pytest.raises(FieldgateError, match="address already in use"):
            await broker.start()


def test_the_broker_dies_with_the_gateway(tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    code = (
        "import asyncio, os\n"
        "from bridge.broker_process import BrokerProcess\n"
        "async def main():\n"
        f"    b = BrokerProcess(['tcp://127.0.0.1:{port}'])\n"
        "    await b.start()\n"
        "    print(b.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.kill()  # kill -9: no chance to clean up
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child)
    finally:
        if parent.poll() is None:
            parent.kill()


def _signal_mask(pid: int, *fields: str) -> int:
    """The union of the signal masks `fields` (SigPnd, ShdPnd, SigCgt...) of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        masks = [int(line.split()[1], 16) for line in f if line.split(":")[0] in fields]
    assert len(masks) == len(fields)
    return functools.reduce(operator.or_, masks)


def _pending(pid: int, sig: signal.Signals) -> bool:
    """Whether `sig` still waits to be delivered to the process (its thread's or the shared pending set)."""
    return bool(_signal_mask(pid, "SigPnd", "ShdPnd") & (1 << (sig - 1)))


async def test_ctrl_c_and_sigterm_to_the_group_leave_the_gateway_its_broker_for_an_orderly_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    broker = BrokerProcess([f"tcp://127.0.0.1:{port}"])
    await broker.start()
    proc, pid = broker._proc, broker.pid
    assert proc is not None and pid is not None
    # Said ready: its SIGTERM handler is in place already (the kernel lists the signal as caught).
    assert _signal_mask(pid, "SigCgt") & (1 << (signal.SIGTERM - 1)), "ready before its SIGTERM handler"
    nudges: list[str] = []

    def noted(name: str) -> Callable[[asyncio.subprocess.Process], None]:
        real = getattr(asyncio.subprocess.Process, name)

        def nudge(self: asyncio.subprocess.Process) -> None:
            nudges.append(name)
            real(self)

        return nudge

    for name in ("terminate", "kill"):
        monkeypatch.setattr(asyncio.subprocess.Process, name, noted(name))
    try:
        # What a terminal's Ctrl-C and `systemctl stop` do: signal every process of the group at once, here
        # right after `ready` (a child that took its SIGTERM handler after saying ready died of this).
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        # No sleep: wait until the kernel has delivered the SIGTERM. A child without its handler yet is
        # killed by that delivery; one with it goes on. The deadline only bounds a failing run.
        deadline = time.monotonic() + 30
        while _alive(pid) and _pending(pid, signal.SIGTERM):
            assert time.monotonic() < deadline, "the SIGTERM was never delivered"
            await asyncio.sleep(0.01)
        assert _alive(pid) and broker.pid == pid, "the broker went before the gateway could say goodbye"
        sub = Subscriber(port, ("t",))
        await asyncio.to_thread(sub.start)  # still serving, after the signals
        sub.stop()
        assert _alive(pid) and broker.pid == pid
    finally:
        await broker.stop()
    # The gateway's stop (stdin closed) ends it by itself: no SIGTERM or SIGKILL was needed after
    # STOP_TIMEOUT, and it exited cleanly (not killed, not by the grace period's timer, 10 s after the SIGTERM).
    assert nudges == [] and proc.returncode == 0
    assert not _alive(pid)


async def test_a_broker_stderr_line_too_long_to_relay_does_not_stop_the_relay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A stderr pipe nobody reads fills, and the broker blocks on its next warning: the relay must go on.
    stderr = asyncio.StreamReader()
    stderr.feed_data(b"x" * 200_000 + b"\nbroker: WARNING after the long one\n")
    stderr.feed_eof()
    broker = BrokerProcess(["tcp://127.0.0.1:1"])
    async with asyncio.timeout(5):
        await broker._relay_stderr(stderr)
    logged = [r.getMessage() for r in caplog.records if r.name == "bridge.broker_process"]
    assert logged[-1] == "broker: WARNING after the long one"
    assert any("too long" in m for m in logged)


async def test_the_childs_login_reports_add_up_and_anything_else_on_its_stdout_is_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Totals per child: what a report counts beyond the last one is new; a child started again from zero adds.
    broker = BrokerProcess(["tcp://127.0.0.1:1"])
    for lines in (
        [
            b'{"login_failures": {"bad_password": 2, "busy": 0}}\n',
            b"not json\n",
            b'{"login_failures": {"bad_password": -5, "invented": 9, "busy": true, "anonymous": 1.5}}\n',
            b"x" * 200_000 + b"\n",
            b'{"login_failures": {"bad_password": 3, "unknown_user": 1}}\n',
        ],
        [b'{"login_failures": {"bad_password": 1}}\n'],  # the next child
    ):
        stdout = asyncio.StreamReader()
        stdout.feed_data(b"".join(lines))
        stdout.feed_eof()
        async with asyncio.timeout(5):
            await broker._read_reports(stdout)
    assert broker.login_failures() == {
        **dict.fromkeys(broker.login_failures(), 0),
        "bad_password": 4,
        "unknown_user": 1,
    }
    assert sorted(broker.login_failures()) == sorted(LOGIN_FAILURES)
    logged = [r.getMessage() for r in caplog.records if r.name == "bridge.broker_process"]
    assert any("not json" in m for m in logged) and any("too long" in m for m in logged)
