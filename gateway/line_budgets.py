"""Warnings for Modbus lines whose poll plans need more of the line's wire time than is healthy (check, run, reload)."""

from __future__ import annotations

from drivers.modbus.bus import line_budget
from gateway.config.schema import Config
from gateway.config.settings import modbus_plan


def budget_warnings(cfg: Config) -> list[str]:
    """One line per bus whose plan needs more than 80 % of the line's wire time."""
    out = []
    for bus in cfg.modbus.buses:
        b = line_budget(modbus_plan(bus))
        if b.overloaded:
            hint = "polls will drift — lengthen `poll` or raise the baud rate"
            out.append(f"modbus bus {bus.name}: poll plan {b.describe()}; {hint}")
    return out
