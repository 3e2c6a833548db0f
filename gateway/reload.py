"""What a reloaded config changes (SIGHUP): the parts to rebuild, and the changes only a restart can apply.

Pure comparisons of two validated configs; `Gateway.reload` carries the result out. Names are the keys:
a bus, sink or device renamed is one removed and one added.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import Loaded, load_config
from gateway.config.addresses import resolve_path
from gateway.config.schema import BusConfig, Config
from gateway.errors import ConfigError
from gateway.line_budgets import budget_warnings

# The logger name these lines had when the app read the file itself: journal filters keep working.
log = logging.getLogger("gateway.app")


def _dump(model: Any) -> Any:
    return model.model_dump(mode="json") if model is not None else None


def restart_needed(old: Config, new: Config) -> list[str]:
    """The changed keys that the running gateway cannot take live (each needs a restart)."""
    keys = []
    for key in ("id", "state_dir", "http", "log_level", "audit"):
        if _dump(old.gateway).get(key) != _dump(new.gateway).get(key):
            keys.append(f"gateway.{key}")
    if _dump(old.broker) != _dump(new.broker):
        keys.append("broker")
    if (old.mcp is None) != (new.mcp is None):
        keys.append("mcp")  # the MCP server is there or not from the start
    elif old.mcp is not None and new.mcp is not None:
        if old.mcp.listen != new.mcp.listen:
            keys.append("mcp.listen")
        if _dump(old.mcp.tls) != _dump(new.mcp.tls):
            keys.append("mcp.tls")
    if _dump(old.simulator) != _dump(new.simulator):
        keys.append("simulator")  # the virtual lines and their slaves are built once, at start
    return keys


@dataclass
class Changes:
    """Names of what was added, removed and changed, in one kind of part."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def summary(self, noun: str) -> list[str]:
        """`+1 device`, `-2 devices`, `~1 device` for the non-zero counts."""
        out = []
        for sign, names in (("+", self.added), ("-", self.removed), ("~", self.changed)):
            if names:
                out.append(f"{sign}{len(names)} {noun}{'' if len(names) == 1 else 's'} ({', '.join(names)})")
        return out


def _compare(old: dict[str, Any], new: dict[str, Any]) -> Changes:
    return Changes(
        added=[n for n in new if n not in old],
        removed=[n for n in old if n not in new],
        changed=[n for n in new if n in old and old[n] != new[n]],
    )


@dataclass
class ConfigDiff:
    """Everything a reload changes, by name."""

    restart_needed: list[str]
    buses: Changes
    sinks: Changes
    devices: Changes  # Modbus and MCP devices together, as the router sees them
    mcp_devices: Changes
    other: list[str]  # sections applied as a whole: `homeassistant`, the `mcp` session settings
    #: The Modbus TCP server is rebuilt: `modbus.server` changed, or a line it serves from was (it holds the lines).
    modbus_server: bool = False

    def summary(self) -> str:
        """One line: `+1 device (boiler2), -1 sink (cloud), bus line1 restarted`."""
        parts = self.devices.summary("device") + self.sinks.summary("sink")
        parts += [f"bus {n} added" for n in self.buses.added] + [f"bus {n} removed" for n in self.buses.removed]
        parts += [f"bus {n} restarted" for n in self.buses.changed]
        parts += ["Modbus TCP server restarted"] if self.modbus_server else []
        parts += [f"{key} updated" for key in self.other]
        return ", ".join(parts) or "nothing changed"


def diff(old: Config, new: Config, old_base: Path | None = None, new_base: Path | None = None) -> ConfigDiff:
    """Compare two validated configs; relative serial ports are taken relative to each file's folder (`*_base`)."""

    def bus(b: BusConfig, base: Path | None) -> Any:
        return _dump(b if base is None else b.model_copy(update={"port": resolve_path(b.port, base)}))

    # Templates are already resolved into each device's points, so a template change shows as device changes.
    buses = _compare(
        {b.name: bus(b, old_base) for b in old.modbus.buses}, {b.name: bus(b, new_base) for b in new.modbus.buses}
    )
    sinks = _compare(
        {s.name: (_dump(s), old.prefix_for(s)) for s in old.northbound},
        {s.name: (_dump(s), new.prefix_for(s)) for s in new.northbound},
    )
    old_mcp = {d.id: _dump(d) for d in old.mcp.devices} if old.mcp else {}
    new_mcp = {d.id: _dump(d) for d in new.mcp.devices} if new.mcp else {}
    devices = _compare(
        {**{d.name: (b.name, _dump(d)) for b in old.modbus.buses for d in b.devices}, **old_mcp},
        {**{d.name: (b.name, _dump(d)) for b in new.modbus.buses for d in b.devices}, **new_mcp},
    )
    other = []
    if _dump(old.homeassistant) != _dump(new.homeassistant):
        other.append("homeassistant")
    if old.mcp is not None and new.mcp is not None:
        settings = {"devices", "listen", "tls"}
        if old.mcp.model_dump(mode="json", exclude=settings) != new.mcp.model_dump(mode="json", exclude=settings):
            other.append("mcp settings")
    server = _dump(old.modbus.server) != _dump(new.modbus.server) or (new.modbus.server is not None and bool(buses))
    return ConfigDiff(restart_needed(old, new), buses, sinks, devices, _compare(old_mcp, new_mcp), other, server)


async def read_for_reload(path: str, old: Config, old_base: Path) -> tuple[Loaded, Path, ConfigDiff] | None:
    """Read the config file again and compare it with the running one: what to apply, or None when it is refused
    (a bad file, or a change only a restart can apply: each reason logged)."""
    try:
        loaded = await asyncio.to_thread(load_config, path)
    except ConfigError as exc:
        for error in exc.errors:
            log.error("%s", error)
        log.error("config reload refused; still running the previous config")
        return None
    base = Path(loaded.path).resolve().parent
    changes = diff(old, loaded.config, old_base, base)
    if changes.restart_needed:
        for key in changes.restart_needed:
            log.error("%s: %s changed, and that needs a restart (systemctl restart fieldgate)", path, key)
        log.error("config reload refused; still running the previous config")
        return None
    for warning in loaded.warnings + budget_warnings(loaded.config):
        log.warning("%s", warning)
    return loaded, base, changes
