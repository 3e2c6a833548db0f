"""The embedded broker in a child process of its own, so that it gets the second core.

The child runs `EmbeddedBroker` on its own event loop (`python -m bridge.broker_process`), reads its
settings as one JSON line on stdin (not argv: `ps` would show the gateway's own broker password), says
`ready` on stdout once its listeners are bound, stops when the gateway closes its stdin, and dies
with the gateway (PR_SET_PDEATHSIG). Ctrl-C and `systemctl stop` signal the whole process group at
once: the child ignores SIGINT and gives SIGTERM a grace period, so that the gateway's own orderly
stop (last messages, `offline` statuses) still has its broker. If it dies, its watcher fails and the
supervisor restarts the watcher with its back-off, which starts the child again: a child that cannot be
started again shows in the supervisor's problems() (so on /healthz) for as long as it cannot. The sinks
reconnect and re-publish the retained state, as after any broker restart.

The child checks the logins, so it counts the refused ones: after `ready` it writes its totals on stdout as a
JSON line (`{"login_failures": {reason: n}}`) whenever they changed, at most every LOGIN_REPORT_INTERVAL, and
the gateway adds what each child counted to `login_failures()` for /metrics, so that a child started again
from zero does not make the counters go down. Refusals a child counted in its last moments before it died
may be missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import json
import logging
import os
import signal
import stat
import sys

from bridge.broker_acl import BrokerAuth
from bridge.broker_users import LOGIN_FAILURES
from gateway.errors import FieldgateError
from gateway.supervise import Supervised, Supervisor

log = logging.getLogger(__name__)

READY = b"ready\n"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
#: After a SIGTERM the child waits this long for the gateway to close its stdin, then stops anyway.
TERM_GRACE = 10.0
#: The child reports its refused logins at most this often (s): a flood of them costs one line per interval.
LOGIN_REPORT_INTERVAL = 0.5


def _die_with_parent() -> None:
    # Linux prctl(PR_SET_PDEATHSIG, SIGKILL): a gateway killed with -9 takes its broker along.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


class BrokerProcess:
    """Runs and supervises the broker child; same start/stop as EmbeddedBroker."""

    def __init__(
        self,
        listeners: list[str],
        *,
        cert: str | None = None,
        key: str | None = None,
        auth: BrokerAuth | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.listeners = listeners
        self.auth = auth
        settings = {"listeners": listeners, "cert": cert, "key": key, "auth": auth.to_json() if auth else None}
        self._args = json.dumps(settings).encode() + b"\n"
        self._proc: asyncio.subprocess.Process | None = None
        # The gateway's supervisor: its back-off is the only one between restarts of the child, and a child
        # that is down (died, or cannot be started again) shows in its problems(), so on /healthz.
        self._supervisor = supervisor or Supervisor()
        self._watcher: Supervised | None = None
        self._relay: asyncio.Task[None] | None = None
        self._reports: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0
        self._login_failures = dict.fromkeys(LOGIN_FAILURES, 0)

    def login_failures(self) -> dict[str, int]:
        """Logins the children refused since this gateway started, by reason (every reason of LOGIN_FAILURES)."""
        return dict(self._login_failures)

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    async def start(self) -> None:
        """Start the child and wait until its listeners are bound."""
        await self._spawn()
        self._watcher = self._supervisor.spawn("broker-process", self._watch)

    async def _spawn(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge.broker_process",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                proc.stdin.write(self._args)
                await proc.stdin.drain()
                line = await proc.stdout.readline()
        except (TimeoutError, ConnectionResetError, BrokenPipeError):
            line = b""
        except asyncio.CancelledError:
            # Stopped while a restart was under way: no broker may be left running that nobody stops.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
            _release(proc)
            raise
        if line != READY:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            err = (await proc.stderr.read()).decode(errors="replace").strip().splitlines()
            await proc.wait()
            _release(proc)
            raise FieldgateError(err[-1] if err else f"embedded broker process did not start on {self.listeners}")
        self._proc = proc
        # Keep reading its stderr: a full pipe would block the broker on its next warning.
        self._relay = asyncio.create_task(self._relay_stderr(proc.stderr), name="broker-process-stderr")
        self._reports = asyncio.create_task(self._read_reports(proc.stdout), name="broker-process-reports")
        log.info("embedded broker (process %d) listening on %s", proc.pid, ", ".join(self.listeners))

    async def _relay_stderr(self, stderr: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stderr.readline()
            except ValueError:
                # A line over the reader's limit (64 KiB): readline dropped it; keep reading, or the pipe fills.
                log.warning("embedded broker wrote a line too long to relay; dropped")
                continue
            if not line:
                return
            log.warning("%s", line.decode(errors="replace").rstrip())

    async def _read_reports(self, stdout: asyncio.StreamReader) -> None:
        # One child's login totals: what it counted beyond its last report is new. Per child, so that one
        # started again from zero adds to the gateway's counts instead of setting them back.
        seen = dict.fromkeys(LOGIN_FAILURES, 0)
        while True:
            try:
                line = await stdout.readline()
            except ValueError:
                log.warning("embedded broker wrote a line too long for a report; dropped")
                continue
            if not line:
                return
            counts = _login_report(line)
            if counts is None:
                log.warning("embedded broker wrote %r where a report of refused logins belongs; ignored", line[:80])
                continue
            for reason, n in counts.items():
                if n > seen[reason]:
                    self._login_failures[reason] += n - seen[reason]
                    seen[reason] = n

    async def _watch(self) -> None:
        # Started again by the supervisor after its back-off, with no child (it died, or the last start
        # failed): start one; a start that fails raises, and the supervisor waits longer before the next.
        if self._proc is None:
            await self._spawn()
            self.restarts += 1
        proc = self._proc
        assert proc is not None
        code = await proc.wait()
        _release(proc)
        if self._proc is proc:
            self._proc = None
        if not self._stopping:
            raise FieldgateError(f"embedded broker process exited ({code})")

    async def stop(self) -> None:
        """Stop the child: close its stdin, then SIGTERM and SIGKILL if it does not go."""
        self._stopping = True
        await self._supervisor.stop(self._watcher)
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.returncode is None:
                await self._end(proc)
        finally:
            if proc is not None:
                _release(proc)
            for task in (self._relay, self._reports):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    @staticmethod
    async def _end(proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None
        proc.stdin.close()
        for nudge in (None, proc.terminate, proc.kill):
            if nudge is not None:
                with contextlib.suppress(ProcessLookupError):
                    nudge()
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await proc.wait()
                return
            except TimeoutError:
                continue


def _login_report(line: bytes) -> dict[str, int] | None:
    """The refused-login totals of one report line from the child, by known reason; None if it is none."""
    try:
        report = json.loads(line)
    except ValueError:
        return None
    counts = report.get("login_failures") if isinstance(report, dict) else None
    if not isinstance(counts, dict):
        return None
    return {r: n for r, n in counts.items() if r in LOGIN_FAILURES and type(n) is int and n >= 0}


def _release(proc: asyncio.subprocess.Process) -> None:
    """Close the pipes' transport of an exited child now, on our loop: left to the garbage collector, it
    would try to close them on a loop that may be gone ("Event loop is closed")."""
    transport = getattr(proc, "_transport", None)
    if transport is not None:
        transport.close()


async def _report_logins() -> None:
    """Child: the refused-login totals as a JSON line on stdout whenever they changed (the gateway reads them)."""
    fd = sys.stdout.fileno()
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        return  # run by hand: a terminal is no gateway, and O_NONBLOCK would be set on the shell's terminal too
    # Never blocking the broker's loop on a gateway that reads late: a line (far below PIPE_BUF) goes whole or
    # not at all, and one not sent is no loss, since the next carries the totals.
    os.set_blocking(fd, False)
    # The child's own login gate; imported here, in the child, so that the gateway (which only reads the
    # totals) does not load amqtt with it.
    from bridge.broker_auth import login_failures

    sent: dict[str, int] | None = None
    while True:
        counts = login_failures()
        if counts != sent:
            try:
                os.write(fd, json.dumps({"login_failures": counts}).encode() + b"\n")
                sent = counts
            except BlockingIOError:
                pass
            except OSError:
                return  # the gateway is gone: stdin's end stops us
        await asyncio.sleep(LOGIN_REPORT_INTERVAL)


async def _serve(listeners: list[str], cert: str | None, key: str | None, auth: BrokerAuth | None) -> None:
    from bridge.broker import EmbeddedBroker

    broker = EmbeddedBroker(listeners, cert=cert, key=key, auth=auth)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before `ready`: a SIGTERM to the group right after it must find the grace period in place.
    loop.add_signal_handler(signal.SIGTERM, loop.call_later, TERM_GRACE, stop.set)
    await broker.start()
    sys.stdout.buffer.write(READY)
    sys.stdout.flush()

    def stdin_readable() -> None:
        if not os.read(sys.stdin.fileno(), 4096):
            loop.remove_reader(sys.stdin.fileno())
            stop.set()  # the gateway closed it (or is gone)

    loop.add_reader(sys.stdin.fileno(), stdin_readable)
    reports = asyncio.create_task(_report_logins())
    await stop.wait()
    reports.cancel()
    await broker.stop()


def main() -> int:
    """Entry point of the child: run the broker until stdin closes (or TERM_GRACE after SIGTERM)."""
    logging.basicConfig(level=logging.WARNING, format="broker: %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the gateway, which stops us in order
    # Unbuffered, a byte at a time: nothing after the line may be read ahead, stdin's end is our stop signal.
    args = json.loads(io.FileIO(sys.stdin.fileno(), closefd=False).readline())
    auth = BrokerAuth.from_json(args["auth"]) if args["auth"] else None
    try:
        asyncio.run(_serve(args["listeners"], args["cert"], args["key"], auth))
    except FieldgateError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
