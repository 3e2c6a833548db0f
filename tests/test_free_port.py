"""free_port (hil/ports.py; tests/helpers.py re-exports it): ports outside the ephemeral range, never handed to two
test processes, never one in use."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from hil import ports
from hil.ports import PORT_RANGE, free_port

TESTS = Path(__file__).resolve().parent

# A test process whose pid-based starting place is the same as every other's (the worst case): it prints
# the ports it was given and keeps them (it lives) until its stdin closes.
TAKER = """
import sys
from hil import ports
ports.os.getpid = lambda: 1
print(" ".join(str(ports.free_port()) for _ in range(int(sys.argv[1]))), flush=True)
sys.stdin.read()
"""


def _taker(count: int, locks: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]),
        "FIELDGATE_TEST_PORT_LOCKS": str(locks),
    }
    return subprocess.Popen(
        [sys.executable, "-c", TAKER, str(count)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )


def test_two_test_processes_never_get_the_same_port(tmp_path: Path) -> None:
    first = _taker(40, tmp_path)
    second = None
    try:
        assert first.stdout is not None
        ports_first = {int(p) for p in first.stdout.readline().split()}
        # The first still holds its ports: the second, starting at the same place, must get others.
        second = _taker(40, tmp_path)
        assert second.stdout is not None
        ports_second = {int(p) for p in second.stdout.readline().split()}
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.communicate("", timeout=30)
    assert len(ports_first) == len(ports_second) == 40
    assert ports_first.isdisjoint(ports_second), sorted(ports_first & ports_second)
    assert all(p in PORT_RANGE for p in ports_first | ports_second)
    # Once the first has exited, its ports are free for the next process (the kernel dropped its locks).
    third = _taker(40, tmp_path)
    assert third.stdout is not None
    ports_third = {int(p) for p in third.stdout.readline().split()}
    third.communicate("", timeout=30)
    assert ports_third == ports_first


def test_a_port_is_outside_the_ephemeral_range_and_not_handed_out_twice() -> None:
    low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == 20
    assert not any(low <= p <= high for p in ports)
    for p in ports:  # each binds, as a server would
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", p))


def test_a_port_someone_listens_on_is_passed_over(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(ports, "_PORT_LOCKS", tmp_path)
    monkeypatch.setattr(ports, "_reserved", {})
    monkeypatch.setattr(ports.os, "getpid", lambda: 1)
    first = free_port()
    os.close(ports._reserved[first])
    monkeypatch.setattr(ports, "_reserved", {})  # as if another process, without the lock scheme
    for fd in os.listdir(tmp_path):
        (tmp_path / fd).unlink()  # and without its lock file
    with socket.socket() as s:
        s.bind(("127.0.0.1", first))
        s.listen()
        assert free_port() != first
