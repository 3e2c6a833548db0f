"""Gateway configs the benches write: plain dicts built by the functions below, dumped with yaml.safe_dump and
validated by the gateway exactly like a user's file.

    write_config(path, config(gateway=gateway_section("bench", state), mcp=mcp_section(listen, devices)))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from drivers.modbus.settings import LineSettings
    from gateway.config.schema import BusConfig

Section = dict[str, Any]


def config(
    *,
    gateway: Section | None = None,
    broker: Section | None = None,
    northbound: Sequence[Section] | None = None,
    modbus: Sequence[Section] | None = None,
    mcp: Section | None = None,
) -> Section:
    """A whole config: the sections given, in the order a user's file has them; `modbus` is its list of lines."""
    out: Section = {}
    if gateway is not None:
        out["gateway"] = gateway
    if broker is not None:
        out["broker"] = broker
    if northbound is not None:
        out["northbound"] = list(northbound)
    if modbus is not None:
        out["modbus"] = {"buses": list(modbus)}
    if mcp is not None:
        out["mcp"] = mcp
    return out


def gateway_section(gateway_id: str, state_dir: Path | str, **settings: Any) -> Section:
    """The `gateway:` section: its id, state directory and further settings (http, log_level, ...)."""
    return {"id": gateway_id, "state_dir": str(state_dir), **settings}


def loopback_listener(port: int) -> str:
    """A broker listener on 127.0.0.1."""
    return f"tcp://127.0.0.1:{port}"


def mcp_section(listen: str, devices: Sequence[Section], **limits: Any) -> Section:
    """The `mcp:` section: where it listens, further settings (limits), the allowed devices last."""
    return {"listen": listen, **limits, "devices": list(devices)}


def mcp_device(device_id: str, token: str, **settings: Any) -> Section:
    """One allowed MCP device."""
    return {"id": device_id, "token": token, **settings}


def modbus_line(name: str, port: str, devices: Sequence[Mapping[str, Any]], **settings: Any) -> Section:
    """One Modbus line (`modbus.buses[]`): its name, port, settings, then its devices."""
    return {"name": name, "port": port, **settings, "devices": [dict(d) for d in devices]}


def modbus_device(name: str, unit: int, points: Sequence[Mapping[str, Any]], poll: str) -> Section:
    """One Modbus device on a line."""
    return {"name": name, "unit": unit, "poll": poll, "points": [dict(p) for p in points]}


def holding_registers(count: int, first: int = 0) -> list[Section]:
    """`count` uint16 holding registers in a row from `first`, named r<address>: one planned read."""
    return [{"name": f"r{a}", "table": "holding", "address": a} for a in range(first, first + count)]


def dump(cfg: Mapping[str, Any]) -> str:
    """A config as YAML text, keys in the order given."""
    return yaml.safe_dump(dict(cfg), sort_keys=False, allow_unicode=True)


def write_config(path: Path, cfg: Mapping[str, Any]) -> Path:
    """Write a config to `path` as YAML; the path."""
    path.write_text(dump(cfg))
    return path


def parse_bus(text: str) -> BusConfig:
    """The first Modbus line of a config's YAML, validated exactly like a user's file."""
    from gateway.config import parse_config

    return parse_config(text, filename="<bench>").config.modbus.buses[0]


def parse_line(text: str) -> LineSettings:
    """The settings the Modbus driver takes for the first line of a config's YAML (validated, then converted)."""
    from gateway.config.settings import modbus_line as line_settings

    return line_settings(parse_bus(text))
