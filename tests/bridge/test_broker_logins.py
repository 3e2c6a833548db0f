"""Broker logins under a flood: a real in-process amqtt broker with a users file, CONNECTs sent over raw sockets.

Each password check is argon2id (64 MiB, a fraction of a second of CPU): without a bound, a flood of
CONNECTs ran one per thread of the default executor (which the sinks also use) and held their memory.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from bridge import broker_auth, broker_users, statefiles
from bridge.broker import EmbeddedBroker
from bridge.broker_users import read_users, set_password
from bridge.statefiles import corrupt_counts
from gateway.broker_access import broker_auth as gateway_broker_auth
from gateway.config import parse_config
from gateway.errors import FieldgateError

from configs import broker, text
from helpers import broker_with_users, free_port, until
from helpers import mqtt_login as login

#: CONNACK return codes (MQTT 3.1.1): accepted, not authorized.
ACCEPTED, NOT_AUTHORIZED = 0, 5


@pytest.fixture(autouse=True)
def counted_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """The corrupt-file and login counters are process-wide: this module's count from zero, others' stay."""
    monkeypatch.setattr(statefiles, "_counts", dict.fromkeys(statefiles.FILES, 0))
    monkeypatch.setattr(broker_auth.LOGINS, "failures", dict.fromkeys(broker_users.LOGIN_FAILURES, 0))


async def test_a_login_flood_runs_two_checks_at_once_refuses_beyond_the_queue_and_counts(
    users: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = broker_auth.LOGINS
    monkeypatch.setattr(gate, "queue", 4)  # 2 running + 4 waiting: a short test
    monkeypatch.setattr(gate, "per_source", 100)  # the bound in all, here (the flood comes from one address)
    monkeypatch.setattr(gate, "peak", 0)
    before = broker_auth.login_failures()
    loop = asyncio.get_running_loop()
    # The threads the checks run on: the gate's own, never the default executor's (the sinks' worker threads).
    threads: set[str] = set()
    real_run = gate._run

    def noted_run(password: str, hashed: str | None) -> bool:
        threads.add(threading.current_thread().name)
        return real_run(password, hashed)

    monkeypatch.setattr(gate, "_run", noted_run)
    async with broker_with_users(users) as port:
        flood = [asyncio.create_task(login(port, "alice", f"guess-{i}")) for i in range(40)]
        await asyncio.sleep(0.3)  # the flood is in: checks run, a few wait, the rest were refused
        # The default executor is not held up by the checks: they are not on it (checked by thread below), and
        # a job on it is done at once. 1 s is generous; checks held there would keep it for the flood's 6 checks.
        started = time.monotonic()
        await loop.run_in_executor(None, time.sleep, 0)
        assert time.monotonic() - started < 1.0
        codes = await asyncio.gather(*flood)
        assert set(codes) <= {NOT_AUTHORIZED, None}
        assert threads and all(t.startswith("broker-login") for t in threads), threads
        after = broker_auth.login_failures()
        assert after["bad_password"] - before["bad_password"] <= 2 + 4 + 2  # what ran or waited (timing slack)
        assert after["busy"] - before["busy"] >= 40 - (2 + 4 + 2)
        assert after["bad_password"] + after["busy"] - before["bad_password"] - before["busy"] == 40
        assert gate.peak <= 2
        # Once the flood is over, the right password gets in again.
        assert await login(port, "alice", "pw-alice") == ACCEPTED
    assert gate.pending == 0 and gate.running == 0


async def test_a_flood_from_one_address_leaves_the_queue_to_a_user_from_another(
    users: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = broker_auth.LOGINS
    monkeypatch.setattr(gate, "queue", 8)  # 2 running + 8 waiting: a short test
    before = broker_auth.login_failures()
    async with broker_with_users(users) as port:
        flooding = True
        biggest = 0

        async def flooder(n: int) -> None:
            # Logs in again as soon as it is answered, wrongly: the queue would stay full of its logins.
            nonlocal biggest
            while flooding:
                await login(port, "alice", f"guess-{n}", source="127.0.0.1")
                biggest = max(biggest, gate.by_source.get("127.0.0.1", 0))
                await asyncio.sleep(0.005)

        # Which checks started, in order (from the check threads): counted, not timed, so that a busy machine's
        # slower argon2 cannot fail it and a longer queue cannot hide in a generous time bound.
        started: list[str] = []
        real_run = gate._run

        def counted_run(password: str, hashed: str | None) -> bool:
            started.append(password)
            return real_run(password, hashed)

        monkeypatch.setattr(gate, "_run", counted_run)
        flood = [asyncio.create_task(flooder(n)) for n in range(20)]
        try:
            await until(lambda: gate.by_source.get("127.0.0.1", 0) >= gate.per_source, 10, "the flood to fill up")
            for _ in range(3):  # again and again, not by luck
                mark = len(started)
                assert await login(port, "alice", "pw-alice", source="127.0.0.2", timeout=60) == ACCEPTED
                # Behind at most the flood's 4 (its share of the queue) and the 2 the threads had taken.
                ahead = started[mark:].index("pw-alice")
                assert ahead <= 2 + 4, started[mark:]
            # The flood still holds its share (each flooder logs in again 5 ms after its answer: looked at in
            # that gap, one place may be free for a moment, as a loaded machine showed once).
            assert gate.per_source == 4
            await until(lambda: gate.by_source.get("127.0.0.1", 0) == gate.per_source, 10, "the flood at its share")
        finally:
            flooding = False
            await asyncio.gather(*flood)
        assert biggest <= 4
        after = broker_auth.login_failures()
        assert after["busy"] > before["busy"] and after["bad_password"] > before["bad_password"]
    await until_idle(gate)


async def until_idle(gate: broker_auth.LoginGate) -> None:
    """Wait until no check runs or waits (checks already handed to a thread finish after their login went)."""
    deadline = time.monotonic() + 10
    while gate.pending or gate.by_source:
        assert time.monotonic() < deadline, (gate.pending, gate.by_source)
        await asyncio.sleep(0.02)


async def test_a_check_keeps_its_place_until_its_thread_is_done_even_when_its_login_is_gone(users: Path) -> None:
    gate = broker_auth.LoginGate(checks=1, queue=0)
    hashed = read_users(users)["alice"]
    first = asyncio.create_task(gate.check("guess", hashed, "10.0.0.1"))
    deadline = time.monotonic() + 5
    while gate.running == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.001)
    first.cancel()  # the client hung up: the argon2 check on its thread goes on all the same
    with pytest.raises(asyncio.CancelledError):
        await first
    assert gate.pending == 1 and gate.by_source == {"10.0.0.1": 1}
    assert await gate.check("pw-alice", hashed, "10.0.0.2") is None  # its thread is still busy: no place
    await until_idle(gate)
    assert await gate.check("pw-alice", hashed, "10.0.0.2") is True
    assert gate.pending == 0 and gate.by_source == {}


async def test_every_refusal_is_counted_by_reason(users: Path) -> None:
    before = broker_auth.login_failures()
    async with broker_with_users(users) as port:
        assert await login(port, None, None) == NOT_AUTHORIZED
        assert await login(port, "mallory", "x") == NOT_AUTHORIZED
        assert await login(port, "alice", "wrong") == NOT_AUTHORIZED
        assert await login(port, "$fieldgate", "wrong") == NOT_AUTHORIZED
        assert await login(port, "alice", "pw-alice") == ACCEPTED
    after = broker_auth.login_failures()
    delta = {k: after[k] - before[k] for k in after}
    assert delta == {**dict.fromkeys(delta, 0), "anonymous": 1, "unknown_user": 1, "bad_password": 2}


async def test_a_hash_the_hasher_cannot_identify_is_a_counted_refusal(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("carol:$argon2x$v=19$m=65536,t=3,p=4$garbage\n")  # pwdlib raises UnknownHashError for it
    before = broker_auth.login_failures()
    async with broker_with_users(path) as port:
        assert await login(port, "carol", "x") == NOT_AUTHORIZED
        assert await login(port, "carol", "y") == NOT_AUTHORIZED  # the broker still answers
    after = broker_auth.login_failures()
    assert after["error"] == before["error"] + 2


def test_a_hash_that_asks_for_gigabytes_makes_the_file_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "users"
    set_password(path, "alice", "pw")
    path.write_text(path.read_text().replace("m=65536", "m=6553600"))  # one flipped digit: 6.25 GiB a login
    with pytest.raises(FieldgateError, match="more than"):
        read_users(path)


@pytest.mark.parametrize(
    "content",
    [bytes(range(256)) * 8, b"alice:not-a-hash\n", b"alice:$argon2id$ok\x00\n"],
    ids=["binary", "bad-line", "nul"],
)
async def test_a_users_file_that_cannot_be_read_is_moved_aside_and_the_broker_starts_with_no_user(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    users = tmp_path / "users"
    users.write_bytes(content)
    port = free_port()
    cfg = parse_config(text({"broker": broker(port, process="inline", users="users")})).config
    before = corrupt_counts()["users"]
    auth = gateway_broker_auth(cfg, tmp_path, "internal-secret-0001")
    assert auth is not None
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("users.corrupt-")]
    assert len(moved) == 1 and moved[0].read_bytes() == content
    assert corrupt_counts()["users"] == before + 1
    assert "corrupt" in caplog.text and moved[0].name in caplog.text
    b = EmbeddedBroker([f"tcp://127.0.0.1:{port}"], auth=auth)
    await b.start()
    try:
        assert await login(port, "alice", "pw-alice") == NOT_AUTHORIZED  # nobody but the gateway's own sinks
        assert await login(port, None, None) == NOT_AUTHORIZED  # and never anonymous
        assert await login(port, "$fieldgate", "internal-secret-0001") == ACCEPTED
    finally:
        await b.stop()


@pytest.mark.parametrize("make", ["missing", "folder"])
def test_a_users_file_that_is_missing_or_no_file_is_left_for_the_operator(tmp_path: Path, make: str) -> None:
    users = tmp_path / "users"
    if make == "folder":
        users.mkdir()
    cfg = parse_config("broker: {users: users}").config
    gateway_broker_auth(cfg, tmp_path, "internal-secret-0001")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["users"] if make == "folder" else [])
