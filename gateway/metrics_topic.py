"""The body of `P/metrics`: every part's counters and gauges, rendered from a snapshot."""

from __future__ import annotations

from dataclasses import asdict

from gateway.clock import ClockSnapshot
from gateway.snapshot import CLOCK, LINES, MCP, MODBUS_SERVER, SINKS, TASKS, GatewaySnapshot
from gateway.types import ModbusDeviceSnapshot, ModbusServerSnapshot

#: The parts of a snapshot the payload reads.
METRICS_PARTS = (LINES, MCP, SINKS, TASKS, MODBUS_SERVER, CLOCK)


def metrics_payload(snapshot: GatewaySnapshot) -> dict[str, object]:
    """Counters and gauges of every part, as published on `P/metrics`; raises what a part that was not read raised."""
    snapshot.require(*METRICS_PARTS)
    mcp = snapshot.mcp
    return {
        "uptime_s": round(snapshot.uptime_s, 1),
        "buses": {line.name: asdict(line.counters) for line in snapshot.lines},
        "devices": {d.name: _device(d) for line in snapshot.lines for d in line.devices},
        "mcp": {
            "sessions": len(mcp.sessions),
            "rejected": mcp.rejected,
            **asdict(mcp.totals),
            "devices": {d.id: asdict(d.counters) for d in mcp.devices},
        }
        if mcp
        else None,
        "sinks": {
            sink.name: {
                **sink.counters,
                **sink.figures,
                "connected": sink.connected,
                "requests_dropped": sink.requests_dropped,
            }
            for sink in snapshot.sinks
        },
        "tasks": {task.name: {"failures": task.failures, "down": task.down} for task in snapshot.tasks},
        "modbus_server": _server(snapshot.modbus_server) if snapshot.modbus_server else None,
        "clock": _clock(snapshot.clock) if snapshot.clock else None,
    }


def _clock(clock: ClockSnapshot) -> dict[str, object]:
    # P/status stays `online`/`offline` (its last will): the clock's state is here and retained on P/status/clock.
    return {
        "synchronized": clock.synchronized,  # null: cannot tell
        "source": clock.source,
        "steps": clock.steps,
        "last_step_s": None if clock.last_step_s is None else round(clock.last_step_s, 3),
    }


def _server(server: ModbusServerSnapshot) -> dict[str, object]:
    # JSON object keys are strings: the exception codes as Modbus writes them.
    return {**asdict(server), "exceptions": {f"0x{code:02X}": n for code, n in sorted(server.exceptions.items())}}


def _device(device: ModbusDeviceSnapshot) -> dict[str, object]:
    counters: dict[str, object] = asdict(device.counters)
    counters["response_counts"] = list(device.counters.response_counts)  # a list, as the driver keeps it
    return {**counters, "online": device.online}
