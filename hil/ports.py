"""Loopback TCP ports that no other test or bench process on the machine can be handed at the same time."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
from pathlib import Path

#: Ports handed out by free_port: below the kernel's ephemeral range (ip_local_port_range, 32768-60999 by
#: default), so no outgoing connection's source port can take one between free_port() and the server's bind.
PORT_RANGE = range(20000, 32000)
_PORT_LOCKS = Path(os.environ.get("FIELDGATE_TEST_PORT_LOCKS", "/tmp/fieldgate-test-ports"))
_reserved: dict[int, int] = {}  # port -> fd of its lock file, held while this process lives
_port_lock = threading.Lock()


def _ephemeral_range() -> range:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    except (OSError, ValueError):
        return range(32768, 61000)
    return range(int(low), int(high) + 1)


def free_port() -> int:
    """A TCP port on loopback that nobody listens on and that no other test process can be handed.

    Binding port 0 and releasing it (the usual way) leaves a window in which another process's outgoing
    connection or another test's free_port() gets the same port. Here each port comes from PORT_RANGE (outside
    the ephemeral range) and is reserved by an flock on /tmp/fieldgate-test-ports/<port>, held until this
    process exits (the kernel drops it then, even after kill -9): tests running beside each other, in any
    number of processes, never share one. A port is handed out once per process, and only if it binds now.
    """
    ephemeral = _ephemeral_range()
    with _port_lock:
        if not _PORT_LOCKS.is_dir():
            _PORT_LOCKS.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                _PORT_LOCKS.chmod(0o1777)  # shared by every user's test runs, like /tmp
        # Start at a place that depends on the pid, so that processes started together do not all try the
        # same first ports (they would still not collide, only wait on each other's locks).
        start = (os.getpid() * 7919) % len(PORT_RANGE)
        for i in range(len(PORT_RANGE)):
            port = PORT_RANGE[(start + i) % len(PORT_RANGE)]
            if port in _reserved or port in ephemeral:
                continue
            fd = os.open(_PORT_LOCKS / str(port), os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if not _binds(port):
                os.close(fd)  # someone outside the tests has it: leave it
                continue
            _reserved[port] = fd
            return port
    raise RuntimeError(f"no free test port left in {PORT_RANGE}")


def _binds(port: int) -> bool:
    """Whether a listener could bind `port` on loopback now (as servers do, with SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
