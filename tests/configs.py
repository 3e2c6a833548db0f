"""One builder of gateway configs for tests: a test names only what differs from a small valid config.

    cfg = config(
        broker=broker(port, process="inline"),
        buses=[line("rs485", "./ttyA", device("plc", 1, points=[point("t", "holding", 0, "int16")]))],
        mcp=mcp(mcp_port, devices=[mcp_device("pump-1")]),
        simulator=simulator(modbus=[sim_line("./ttyA", sim_slave(1))]),
    )
    path = write(cfg, tmp_path)  # tmp_path / "config.yaml"

Each builder returns the plain dict `fieldgate` reads from YAML, so a test can still change one key by hand.
A key given as None is left out (the gateway's default applies), except `gateway.http`, where None is the
`http: null` that turns the status page off, as most tests want. A config whose point is how it is written
(comments, a syntax error, an unknown key, anchors) stays YAML text in its test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

Section = dict[str, Any]

#: An MCP device token long enough for `fieldgate check` (16 characters at least).
TOKEN = "s3cret-token-0001"


class _Default:
    """The type of DEFAULT."""

    def __repr__(self) -> str:
        return "DEFAULT"


#: Given for `http`: the key is left out and the gateway's default listener (127.0.0.1:9720) applies.
DEFAULT: Any = _Default()


def _given(**keys: Any) -> Section:
    """The keys whose value is not None, in the order given."""
    return {k: v for k, v in keys.items() if v is not None}


def config(
    *,
    id: str = "t1",
    state_dir: str | Path = "./state",
    http: str | None = None,
    log_level: str | None = None,
    audit: Section | None = None,
    broker: Section | None = None,
    northbound: list[Section] | None = None,
    templates: dict[str, list[Section]] | None = None,
    buses: list[Section] | None = None,
    mcp: Section | None = None,
    homeassistant: Section | None = None,
    simulator: Section | None = None,
) -> Section:
    """A whole gateway config: gateway `id` in `state_dir` with no status page unless `http` is given.

    A section not given is the gateway's own default: give `broker` (the default listens on port 1883, which
    tests running beside each other would share) unless it is `broker(enabled=False)` with sinks that have urls.
    """
    gateway: Section = {"id": id, "state_dir": str(state_dir)}
    if not isinstance(http, _Default):
        gateway["http"] = http
    gateway.update(_given(log_level=log_level, audit=audit))
    modbus = _given(templates=templates, buses=buses)
    return _given(
        gateway=gateway,
        broker=broker,
        northbound=northbound,
        modbus=modbus or None,
        mcp=mcp,
        homeassistant=homeassistant,
        simulator=simulator,
    )


def broker(port: int | None = None, *, process: str | None = None, **keys: Any) -> Section:
    """The embedded broker, listening on 127.0.0.1:`port` when one is given (`broker(enabled=False)`: none)."""
    listeners = [f"tcp://127.0.0.1:{port}"] if port is not None else None
    return _given(listeners=listeners, process=process, **keys)


def sink(name: str, url: str | None = None, **keys: Any) -> Section:
    """A northbound sink: to the broker at `url`, or to the embedded broker without one.

    A sink with a url (or urls) replays at once after a reconnect (`spool.replay_delay: 0`) unless told otherwise:
    the product's random delay of up to 10 s spreads a fleet out, and would only slow the tests down.
    """
    if url is not None or "urls" in keys:
        spool = dict(keys.pop("spool", None) or {})
        spool.setdefault("replay_delay", 0)
        keys["spool"] = spool
    return _given(name=name, url=url, **keys)


def line(
    name: str, port: str, *devices: Section, baudrate: int | None = 115200, parity: str | None = "N", **keys: Any
) -> Section:
    """A Modbus serial line at `port`, at the simulators' pace (115200 baud, no parity) unless told otherwise."""
    return _given(name=name, port=port, baudrate=baudrate, parity=parity, **keys) | {"devices": list(devices)}


def device(name: str, unit: int = 1, *, points: list[Section] | None = None, **keys: Any) -> Section:
    """A Modbus device (`poll`, `template`, `write_rate`... as keys)."""
    return _given(name=name, unit=unit, **keys, points=points)


def point(name: str, table: str, address: int, type: str | None = None, **keys: Any) -> Section:
    """A point of a Modbus device (`writable`, `scale`, `min`, `bits`... as keys)."""
    return _given(name=name, table=table, address=address, type=type, **keys)


def mcp(listen: int | str, *, devices: list[Section] | None = None, **keys: Any) -> Section:
    """The MCP server, on 127.0.0.1:`listen` when it is a port number."""
    address = f"127.0.0.1:{listen}" if isinstance(listen, int) else listen
    return _given(listen=address, **keys, devices=devices)


def mcp_device(id: str, token: Any = TOKEN, **keys: Any) -> Section:
    """An MCP device allowed to log in (`write_rate`, `meta`, `points`... as keys)."""
    return _given(id=id, token=token, **keys)


def simulator(*, modbus: list[Section] | None = None, mcp: list[Section] | None = None) -> Section:
    """Virtual field devices the gateway starts in-process."""
    return _given(modbus=modbus, mcp=mcp)


def sim_line(link: str, *slaves: Section) -> Section:
    """A simulated serial line whose gateway end is linked at `link`."""
    return {"link": link, "devices": list(slaves)}


def sim_slave(unit: int, values: dict[str, Section] | None = None, *, dead: bool | None = None) -> Section:
    """A simulated Modbus slave: `values` maps a point name to how it moves, e.g. {"level": {"value": 7}}."""
    return _given(unit=unit, values=values, dead=dead)


def sim_mcp(id: str, interval: str | None = None, values: dict[str, Section] | None = None) -> Section:
    """A simulated MCP device that logs in as `id` (its token taken from mcp.devices) and pushes DATA."""
    return _given(id=id, interval=interval, values=values)


class _Dumper(yaml.SafeDumper):
    """safe_dump without anchors: a section used twice is written out twice, as a person would."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def text(cfg: Section) -> str:
    """The config as the YAML a person would write."""
    return yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False)


def write(cfg: Section, path: Path) -> Path:
    """Write the config as YAML to `path` (a folder: to its `config.yaml`); the file written."""
    if path.is_dir():
        path = path / "config.yaml"
    path.write_text(text(cfg), encoding="utf-8")
    return path
