"""What keeps the gateway from being healthy, read off a snapshot: for /healthz, the status page and the watchdog."""

from __future__ import annotations

from gateway.snapshot import LINES, SINKS, TASKS, GatewaySnapshot
from gateway.types import ModbusLineSnapshot

#: The parts of a snapshot `problems` reads: /healthz and the watchdog take only these.
HEALTH_PARTS = (SINKS, TASKS, LINES)


def line_stuck(line: ModbusLineSnapshot, now: float) -> str | None:
    """Why a Modbus line looks stuck at `now` (its task has not moved for longer than any healthy step takes)."""
    idle = now - line.alive_at
    if idle <= line.alive_limit or line.stopping:  # a line being stopped (a reload) is not stuck
        return None
    return (
        f"modbus line {line.name} ({line.port}) has not moved for {idle:.1f} s "
        f"(its longest step is {line.alive_limit:.1f} s): stuck in I/O"
    )


def problems(snapshot: GatewaySnapshot, *, lasting: bool = False) -> list[str]:
    """Why the gateway is not healthy: a sink's outbox that is not running, a supervised task that failed and waits
    for its restart, a Modbus line whose task ended or that has not moved for longer than any healthy step takes.

    With `lasting` (the watchdog), a supervised task counts only once it keeps failing: one failure the
    supervisor's restart fixes must not have systemd restart the whole gateway (see LASTING_FAILURES).
    """
    snapshot.require(*HEALTH_PARTS)
    out = [f"sink {sink.name}: {sink.problem}" for sink in snapshot.sinks if sink.problem]
    out += snapshot.lasting_task_problems if lasting else snapshot.task_problems
    for line in snapshot.lines:
        if line.stopping:
            continue  # going away (a reload), not stuck
        if not line.running:
            out.append(f"modbus line {line.name}: its task has ended")
        elif stuck := line_stuck(line, snapshot.taken_at):
            out.append(stuck)
    return out
