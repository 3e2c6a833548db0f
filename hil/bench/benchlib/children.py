"""Spawned child processes driven over a pipe, so that each role's CPU in /proc is its own.

The orchestrator sends (cmd, arg) and gets ("ok", value) or ("error", traceback); a child's target
takes its arguments and its end of the pipe, answers the first "ok" once it is ready, and serves
commands until "stop".
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from .procs import cpu_or_nan


class Child:
    """A spawned process driven over a pipe: send (cmd, arg), get ("ok", value) or ("error", traceback)."""

    def __init__(self, name: str, target: Callable[..., None], *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs an event loop
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child_main, args=(target, args, child), name=name, daemon=True)
        self.proc.start()
        child.close()
        assert self.proc.pid is not None
        self.pid: int = self.proc.pid

    def call(self, cmd: str, arg: Any = None, timeout: float = 60.0) -> Any:
        """Send a command and wait for its answer."""
        self.send(cmd, arg)
        return self.wait(timeout, cmd)

    def send(self, cmd: str, arg: Any = None) -> None:
        """Send a command; `wait` collects the answer."""
        self.conn.send((cmd, arg))

    def wait(self, timeout: float, what: str = "start") -> Any:
        """The next answer of the child."""
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.name}: no answer to {what!r} within {timeout:g} s")
        kind, value = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"{self.name} failed:\n{value}")
        return value

    def cpu(self) -> float:
        """CPU seconds used by the child so far (nan once it is gone)."""
        return cpu_or_nan(self.pid)

    def stop(self, timeout: float = 20.0) -> None:
        """Ask the child to stop; terminate, then kill it if it does not."""
        if self.proc.is_alive() and timeout:
            with contextlib.suppress(Exception):
                self.conn.send(("stop", None))
            self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(3)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(3)
        self.conn.close()


@dataclass
class Pid:
    """A process the bench did not spawn (e.g. the gateway's broker child): only its CPU is read."""

    pid: int

    def cpu(self) -> float:
        """CPU seconds used by the process so far (nan once it is gone)."""
        return cpu_or_nan(self.pid)


def stop_all(children: Sequence[Child]) -> None:
    """Stop every child at once (clients close their sockets while the gateway stops); kill the stragglers."""
    for c in children:
        if c.proc.is_alive():
            with contextlib.suppress(Exception):
                c.conn.send(("stop", None))
    deadline = time.monotonic() + 10
    for c in children:
        c.proc.join(max(0.1, deadline - time.monotonic()))
    for c in children:
        c.stop(timeout=0)


def _child_main(target: Callable[..., None], args: tuple[Any, ...], conn: Connection) -> None:
    try:
        target(*args, conn)
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))
        raise SystemExit(1) from None


Handler = Callable[[Any], Awaitable[Any]]


async def serve_pipe(conn: Connection, handlers: dict[str, Handler]) -> None:
    """Answer the orchestrator's commands one after the other until "stop" (answered by the caller)."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def readable() -> None:
        try:
            inbox.put_nowait(conn.recv())
        except (EOFError, OSError):  # the orchestrator is gone
            loop.remove_reader(conn.fileno())
            inbox.put_nowait(("stop", None))

    loop.add_reader(conn.fileno(), readable)
    try:
        while True:
            cmd, arg = await inbox.get()
            if cmd == "stop":
                return
            try:
                result = await handlers[cmd](arg)
            except Exception:
                conn.send(("error", traceback.format_exc()))
            else:
                conn.send(("ok", result))
    finally:
        with contextlib.suppress(Exception):
            loop.remove_reader(conn.fileno())
