"""Processes as /proc sees them (CPU, RSS, descriptors, children), the descriptor limit, quiet logs, and
`fieldgate run` as a child process on a config of the bench's own."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._root import ROOT

CLK_TCK = os.sysconf("SC_CLK_TCK")
STOP_TIMEOUT = 15.0  # s a gateway has after SIGTERM before it is killed
#: The project's own loggers (quiet_logs sets them apart from the libraries').
PROJECT_LOGGERS = ("bridge", "drivers", "gateway")


# --- /proc readings -----------------------------------------------------------------------------


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (all its threads), or of one of its threads, in seconds (1/CLK_TCK resolution)."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    with open(path) as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_or_nan(pid: int) -> float:
    """cpu_seconds(pid), or nan once the process is gone."""
    try:
        return cpu_seconds(pid)
    except OSError:
        return float("nan")


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each live thread of this process, by thread name (/proc/self/task)."""
    out: dict[str, float] = {}
    for t in threading.enumerate():
        if t.native_id is None:
            continue
        try:
            out[t.name] = out.get(t.name, 0.0) + cpu_seconds(os.getpid(), t.native_id)
        except OSError:
            continue  # ended meanwhile
    return out


def rss_kb(pid: int | str = "self") -> int:
    """VmRSS of a process in KiB (0 when it has none, e.g. a zombie)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def rss_mb(pid: int | str = "self") -> float:
    """VmRSS of a process in MiB."""
    return rss_kb(pid) / 1024


def rss_kb_or_zero(pid: int | None) -> int:
    """rss_kb(pid), or 0 when there is no such process (or no pid)."""
    if pid is None:
        return 0
    try:
        return rss_kb(pid)
    except OSError:
        return 0


def open_fds(pid: int | str = "self") -> int:
    """File descriptors a process holds."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def parent_of(pid: int) -> int | None:
    """A process's parent pid (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def children(pid: int) -> list[int]:
    """The pids of a process's children, in order."""
    return sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit() and parent_of(int(entry)) == pid)


# --- limits and logs ------------------------------------------------------------------------------


def raise_nofile() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; (soft, hard) after."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


#: The level of the project's own loggers in a quieted bench process (default CRITICAL): WARNING or DEBUG shows
#: e.g. why sessions end.
LOG_LEVEL_ENV = "MCP_BENCH_LOG"


def quiet_logs(libraries: Sequence[str] = ("amqtt", "transitions")) -> None:
    """Only errors: per-session INFO lines and amqtt's shutdown chatter ("n messages not broadcasted") would swamp
    a report. `libraries` are silenced, the project's loggers are at $MCP_BENCH_LOG (default CRITICAL), and so is
    asyncio's "socket.accept() out of system resource", which benches that probe the descriptor limit expect."""
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    for name in libraries:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    ours = os.environ.get(LOG_LEVEL_ENV, "CRITICAL").upper()
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(ours)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


# --- a fresh interpreter per measurement -------------------------------------------------------------


def run_fresh(
    argv: Sequence[str],
    what: str,
    *,
    prefix: Sequence[str] = (),
    timeout: float | None = None,
    cwd: Path | None = None,
) -> Any:
    """Run `python ARGV` (under `prefix`, e.g. strace, when given) and return the JSON of its last line of output:
    a measurement in an interpreter of its own, whose allocations and threads no earlier one left behind.
    RuntimeError naming `what`, with the end of its stderr, when it fails."""
    done = subprocess.run([*prefix, sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- `fieldgate run` as a child process ------------------------------------------------------------


def fieldgate_command() -> list[str]:
    """The `fieldgate` console script next to this Python, or `python -m gateway` without one."""
    script = Path(sys.executable).parent / "fieldgate"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway"]


class GatewayProcess:
    """`fieldgate run -c CONFIG` (or `command`) as a child process with its output in a log file.

    `env` is added to this process's environment, with the repository on PYTHONPATH. `own_session`: the
    gateway leads a process group of its own, so that a kill reaches its broker child too.
    """

    def __init__(
        self,
        config: Path,
        log: Path,
        *,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        unset: Sequence[str] = (),
        own_session: bool = False,
    ) -> None:
        self.log = log
        environ = {**os.environ, **(env or {})}
        for name in unset:
            environ.pop(name, None)
        environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        argv = [*(command or [sys.executable, "-m", "gateway"]), "run", "-c", str(config)]
        self.own_session = own_session
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=config.parent,
                env=environ,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=own_session,
            )
        self._broker_pid: int | None = None

    @property
    def pid(self) -> int:
        """The gateway's process id."""
        return self.proc.pid

    @property
    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def output(self) -> str:
        """What it logged so far."""
        return self.log.read_text(errors="replace")

    def broker_pid(self) -> int | None:
        """The embedded broker child's process id (found again if it was restarted), or None."""
        if self._broker_pid is not None and parent_of(self._broker_pid) == self.pid:
            return self._broker_pid
        self._broker_pid = next(iter(children(self.pid)), None)
        return self._broker_pid

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """SIGTERM, SIGKILL (its process group when it has one) after `timeout`; whether it exited by itself."""
        if self.proc.poll() is not None:
            return True
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            if self.own_session:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
            self.proc.wait()
            return False
