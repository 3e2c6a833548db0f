"""The broker's login gate under a flood, watched from outside the gate: a probe around the argon2 hasher itself
counts the checks that run at once, and a job on the default executor (the sinks' worker threads) shows it stays
free. A real in-process amqtt broker with a users file; wrong-password CONNECTs over raw sockets from ten loopback
addresses, four each (LOGIN_PER_SOURCE), so that the gate's queue fills as it would in a flood from many hosts.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from pathlib import Path

import pytest
from pwdlib import PasswordHash

from bridge import broker_auth, broker_users, statefiles
from bridge.broker_auth import LOGIN_CHECKS, LOGIN_PER_SOURCE, LOGIN_QUEUE

from helpers import broker_with_users, mqtt_login, until

_ids = itertools.count()
NOT_AUTHORIZED = 5  # CONNACK return code (MQTT 3.1.1)
SOURCES = [f"127.0.0.{n}" for n in range(2, 12)]
FLOOD = len(SOURCES) * LOGIN_PER_SOURCE  # more than the gate takes (checks + queue): some are refused at once


class ArgonProbe:
    """Stands in for broker_auth's hasher: counts the argon2 checks that run at once and those done, then checks."""

    def __init__(self, real: PasswordHash) -> None:
        self.real = real
        self.running = 0
        self.peak = 0
        self.done = 0
        self._lock = threading.Lock()

    def verify(self, password: str, hashed: str) -> bool:
        """The real check, counted."""
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            return self.real.verify(password, hashed)
        finally:
            with self._lock:
                self.running -= 1
                self.done += 1

    def hash(self, password: str) -> str:
        """The real hash (the unknown-user check's dummy hash is made with it)."""
        return self.real.hash(password)


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> ArgonProbe:
    """A fresh login gate (its threads do not survive a fork) and counters, and the probe in the hasher's place."""
    monkeypatch.setattr(statefiles, "_counts", dict.fromkeys(statefiles.FILES, 0))
    monkeypatch.setattr(broker_auth, "LOGINS", broker_auth.LoginGate())
    argon = ArgonProbe(broker_users._HASHER)
    monkeypatch.setattr(broker_users, "_HASHER", argon)
    return argon


async def wrong_login(port: int, source: str) -> int | None:
    """alice with a wrong password from `source`: the CONNACK's return code (None: closed without one)."""
    return await mqtt_login(port, "alice", f"guess-{next(_ids)}", timeout=120, source=source)


def flood(port: int) -> list[asyncio.Task[int | None]]:
    """FLOOD wrong logins at once, LOGIN_PER_SOURCE from each of SOURCES."""
    return [asyncio.create_task(wrong_login(port, s)) for s in SOURCES for _ in range(LOGIN_PER_SOURCE)]


async def test_a_login_flood_runs_at_most_the_gates_checks_at_once_and_leaves_the_default_executor_free(
    users: Path, probe: ArgonProbe
) -> None:
    loop = asyncio.get_running_loop()
    gate = broker_auth.LOGINS
    async with broker_with_users(users) as port:
        logins = flood(port)
        # Half the gate's places taken (a check is 0.2 s or more: the rest drain over seconds).
        await until(lambda: gate.pending >= (LOGIN_CHECKS + LOGIN_QUEUE) // 2, 60, "the flood to fill the gate")
        submitted = probe.done

        def job() -> int:
            return probe.done  # how many checks ended before a worker thread of the default executor took this

        ran_after = await loop.run_in_executor(None, job)
        codes = await asyncio.gather(*logins)
    assert set(codes) <= {NOT_AUTHORIZED}, codes
    # Counted in checks, not seconds: the job waits for no check. Checks on the default executor would put
    # it behind every one queued there (LOGIN_QUEUE // 2 or more); a few running ones may end meanwhile.
    assert ran_after - submitted <= LOGIN_CHECKS + 2, (submitted, ran_after)
    # What ran, counted by the hasher, not by the gate: every place the gate has was taken, and no more (the
    # flood arrives within milliseconds; all of it checked would need six checks, three rounds of argon2, to
    # end while it arrived), and never more than LOGIN_CHECKS checks (64 MiB each) at once.
    assert LOGIN_CHECKS + LOGIN_QUEUE <= probe.done < FLOOD, probe.done
    assert probe.peak == LOGIN_CHECKS, probe.peak
