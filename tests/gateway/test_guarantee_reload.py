"""README "Changing the config while running": every key only a restart can apply is refused by a reload, by name.

The cases are a table checked against the config schema itself: a key added to the schema and not classified
here (restart-only or live) fails `test_every_key_of_the_schema_is_classified`, so it cannot slip by unreviewed.
"""

from __future__ import annotations

import copy
import logging
import re
import types
import typing
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from bridge.broker_users import set_password
from gateway.app import Gateway
from gateway.config import load_config, parse_config
from gateway.config.schema import Config
from gateway.reload import restart_needed

from helpers import free_port

TOKEN = "pump-token-0123456789"


def plain(port: int = 1883, mcp_port: int = 7720) -> dict[str, Any]:
    """A gateway with a simulated line, an MCP server, no broker users and no TLS."""
    return {
        "gateway": {"id": "t1", "state_dir": "./state", "http": None, "log_level": "INFO", "audit": {}},
        "broker": {"listeners": [f"tcp://127.0.0.1:{port}"]},
        "northbound": [{"name": "local"}],
        "modbus": {
            "buses": [
                {
                    "name": "line1",
                    "port": "./ttyA",
                    "baudrate": 115200,
                    "parity": "N",
                    "devices": [
                        {
                            "name": "boiler",
                            "unit": 1,
                            "poll": "100ms",
                            "points": [{"name": "temp", "table": "holding", "address": 0}],
                        }
                    ],
                }
            ]
        },
        "mcp": {"listen": f"127.0.0.1:{mcp_port}", "devices": [{"id": "pump-1", "token": TOKEN}]},
        "homeassistant": {"enabled": False},
        "simulator": {"modbus": [{"link": "./ttyA", "devices": [{"unit": 1, "values": {"temp": {"value": 21}}}]}]},
    }


def secure() -> dict[str, Any]:
    """The same with broker users, an ACL, a TLS broker listener and MCP over TLS: the keys under them differ."""
    cfg = plain()
    cfg["broker"].update(
        listeners=["tcp://127.0.0.1:1883", "mqtts://127.0.0.1:8883"],
        users="users",
        acl={"grafana": {"read": ["fieldgate/#"]}},
        cert="broker.pem",
        key="broker.key",
    )
    cfg["mcp"]["tls"] = {"cert": "mcp.pem", "key": "mcp.key", "client_ca": "ca.pem"}
    return cfg


def upstream() -> dict[str, Any]:
    """The plain config publishing only to an upstream broker, so that the embedded one may be switched off."""
    cfg = plain()
    cfg["northbound"] = [{"name": "cloud", "url": "mqtt://127.0.0.1:1883"}]
    return cfg


BASES = {"plain": plain, "secure": secure, "upstream": upstream}
DELETE = object()  # a change that removes the key


@dataclass(frozen=True)
class Case:
    """One key changed alone: where, to what, on which base config, and the name a reload must refuse it by."""

    key: str  # the schema path this case changes (`mcp` alone: the section added or removed)
    value: Any
    refused_as: str | None  # None: a live key, taken by a reload
    base: str = "plain"

    @property
    def id(self) -> str:
        return f"{self.key}={'<removed>' if self.value is DELETE else self.value}@{self.base}"


RESTART_ONLY = [
    Case("gateway.id", "t2", "gateway.id"),
    Case("gateway.state_dir", "./elsewhere", "gateway.state_dir"),
    Case("gateway.log_level", "DEBUG", "gateway.log_level"),
    Case("gateway.http", "127.0.0.1:9799", "gateway.http"),
    Case("gateway.audit.max_size", "2MB", "gateway.audit"),
    Case("gateway.audit.backups", 7, "gateway.audit"),
    Case("broker.enabled", False, "broker", base="upstream"),  # a `local` sink needs the broker
    Case("broker.process", "inline", "broker"),
    Case("broker.listeners", ["tcp://127.0.0.1:1884"], "broker"),
    Case("broker.users", "users", "broker"),
    Case("broker.users", "other-users", "broker", base="secure"),
    Case("broker.acl", {"grafana": {"read": ["#"]}}, "broker", base="secure"),
    Case("broker.acl", DELETE, "broker", base="secure"),
    Case("broker.cert", "broker.pem", "broker"),
    Case("broker.cert", "other.pem", "broker", base="secure"),
    Case("broker.key", "broker.key", "broker"),
    Case("broker.key", "other.key", "broker", base="secure"),
    Case("mcp", DELETE, "mcp"),
    Case("mcp.listen", "127.0.0.1:7799", "mcp.listen"),
    Case("mcp.tls", {"cert": "mcp.pem", "key": "mcp.key"}, "mcp.tls"),
    Case("mcp.tls", DELETE, "mcp.tls", base="secure"),
    Case("mcp.tls.cert", "other.pem", "mcp.tls", base="secure"),
    Case("mcp.tls.key", "other.key", "mcp.tls", base="secure"),
    Case("mcp.tls.client_ca", "other-ca.pem", "mcp.tls", base="secure"),
    Case("simulator", DELETE, "simulator"),
    Case("simulator.modbus", [{"link": "./ttyA", "devices": [{"unit": 1, "dead": True}]}], "simulator"),
    Case("simulator.mcp", [{"id": "pump-1", "interval": "1s"}], "simulator"),
    Case("simulator.modbus_tcp", [{"listen": "127.0.0.1:5502", "devices": [{"unit": 1}]}], "simulator"),
]
# Adding `mcp` to a gateway without one is the same key the other way round.
ADD_MCP = Case("mcp", {"listen": "127.0.0.1:7720"}, "mcp")

LIVE = [
    Case("mcp.heartbeat_s", 10, None),
    Case("mcp.ack_timeout", "2s", None),
    Case("mcp.retries", 1, None),
    Case("mcp.max_payload", "512KB", None),
    Case("mcp.max_sessions", 10, None),
    Case("mcp.hello_timeout", "5s", None),
    Case("mcp.max_hello_payload", "1KB", None),
    Case("mcp.max_hello_errors", 2, None),
    Case("mcp.max_pending", 16, None),
    Case("mcp.max_pending_per_ip", 4, None),
    Case("mcp.auth_ban_failures", 3, None),
    Case("mcp.auth_ban_window", "30s", None),
    Case("mcp.auth_ban_time", "10s", None),
    Case("mcp.max_points", 16, None),
    Case("mcp.max_string", 64, None),
    Case("mcp.max_unread", "8KB", None),
    Case("mcp.max_future_ts", "1h", None),
    Case("mcp.devices", [{"id": "pump-2", "token": TOKEN}], None),
    Case("homeassistant.enabled", True, None),
    Case("homeassistant.discovery_prefix", "ha", None),
    Case("northbound", [{"name": "local", "spool": {"commit_window": "50ms"}}], None),
    Case("modbus.buses", [], None),
    Case("modbus.templates", {"t": [{"name": "a", "table": "coil", "address": 0}]}, None),
    # The Modbus TCP server (added by each of these to the plain config) is rebuilt by a reload that changes it.
    Case("modbus.server.listen", "127.0.0.1:5021", None),
    Case("modbus.server.max_connections", 4, None),
    Case("modbus.server.max_queue", 2, None),
    Case("modbus.server.idle_timeout", "1m", None),
    Case("modbus.server.cache_max_age", "5s", None),
    Case("modbus.server.expose", [{"unit": 1, "device": "boiler", "writes": True}], None),
]


def changed(case: Case, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The base config with only this case's key changed."""
    cfg = copy.deepcopy(base if base is not None else BASES[case.base]())
    *parents, last = case.key.split(".")
    node = cfg
    for part in parents:
        node = node.setdefault(part, {})
    if case.value is DELETE:
        del node[last]
    else:
        assert node.get(last) != case.value, f"{case.id} changes nothing"
        node[last] = copy.deepcopy(case.value)
    return cfg


def parsed(cfg: dict[str, Any]) -> Config:
    """A validated config from a dict, as a reload would read it from YAML."""
    return parse_config(yaml.safe_dump(cfg)).config


# --- the table against the schema ------------------------------------------------------------------------


def _model(annotation: Any) -> type[BaseModel] | None:
    """The model an annotation holds (through `X | None`), or None for a leaf (scalars, lists, dicts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [m for a in typing.get_args(annotation) if (m := _model(a)) is not None]
        return models[0] if len(models) == 1 else None
    return None


def schema_keys(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[str]:
    """Every key of the schema down to the leaves; lists and maps of models (buses, sinks, devices) are one key."""
    for name, info in model.model_fields.items():
        sub = _model(info.annotation)
        path = f"{prefix}{name}"
        if sub is None:
            yield path
        else:
            yield from schema_keys(sub, f"{path}.")


def test_every_key_of_the_schema_is_classified() -> None:
    classified = {c.key for c in RESTART_ONLY + LIVE}
    # A section that is there or not (`mcp`, `simulator`) is a key of its own besides its leaves.
    unclassified = set(schema_keys()) - classified
    assert unclassified == set(), f"classify these keys as restart-only or live in {__file__}: {sorted(unclassified)}"
    assert classified - set(schema_keys()) <= {"mcp", "simulator", "mcp.tls"}


def test_the_restart_only_keys_are_the_ones_the_readme_names() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    sentence = readme.split("A change only a restart")[1].split("is refused the same way")[0]
    named = re.findall(r"`([^`]+)`", sentence)  # `gateway.id`, `state_dir`, ..., `mcp.listen`/`tls`, ...
    refused = {c.refused_as for c in RESTART_ONLY}
    # The README shortens `gateway.state_dir` to `state_dir` and `mcp.tls` to `tls` (after `mcp.listen`).
    spelled = {n if n in refused else f"gateway.{n}" if f"gateway.{n}" in refused else f"mcp.{n}" for n in named}
    assert spelled == refused


# --- the diff, key by key --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [*RESTART_ONLY, ADD_MCP], ids=lambda c: c.id)
def test_a_restart_only_key_changed_alone_is_named_as_needing_a_restart(case: Case) -> None:
    old = BASES[case.base]()
    if case is ADD_MCP:
        old = {k: v for k, v in old.items() if k not in ("mcp", "simulator")}  # the simulator's devices need it
    new = changed(case, old)
    assert restart_needed(parsed(old), parsed(new)) == [case.refused_as]
    assert restart_needed(parsed(new), parsed(old)) == [case.refused_as]  # and back again


@pytest.mark.parametrize("case", LIVE, ids=lambda c: c.id)
def test_a_live_key_changed_alone_needs_no_restart(case: Case) -> None:
    old = plain()
    assert restart_needed(parsed(old), parsed(changed(case, old))) == []


# --- a running gateway -------------------------------------------------------------------------------------


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Gateway, Path, dict[str, Any]]]:
    """A gateway started from the plain config (its own ports); yields it, its config path and the config."""
    set_password(tmp_path / "users", "grafana", "pw-grafana")  # for the case that adds `broker.users`
    base = plain(free_port(), free_port())
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(base))
    gw = Gateway(load_config(path))
    await gw.start()
    try:
        yield gw, path, base
    finally:
        await gw.stop()


async def test_a_running_gateway_refuses_each_restart_only_change_and_keeps_its_config(
    running: tuple[Gateway, Path, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    gw, path, base = running
    before, loaded = gw.cfg, gw.loaded
    bus, outbox, mcp = gw.buses[0], gw.outboxes[0], gw.mcp
    caplog.set_level(logging.ERROR, logger="gateway.app")
    for case in [c for c in RESTART_ONLY if c.base == "plain"]:
        caplog.clear()
        path.write_text(yaml.safe_dump(changed(case, base)))
        assert await gw.reload() is False, case.id
        refusals = [r.getMessage() for r in caplog.records]
        assert f"{path}: {case.refused_as} changed, and that needs a restart (systemctl restart fieldgate)" in refusals
        assert refusals[-1] == "config reload refused; still running the previous config"
        # Nothing was swapped: the same config, line, sink and MCP server as before.
        assert (gw.cfg, gw.loaded) == (before, loaded) and gw.cfg is before, case.id
        assert gw.buses == [bus] and gw.outboxes == [outbox] and gw.mcp is mcp, case.id
        assert bus.running
    # A live change after all these refusals is taken.
    path.write_text(yaml.safe_dump(changed(Case("mcp.max_points", 16, None), base)))
    assert await gw.reload() is True
    assert gw.cfg.mcp is not None and gw.cfg.mcp.max_points == 16


async def test_a_running_gateway_takes_live_changes_without_a_restart(
    running: tuple[Gateway, Path, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    gw, path, base = running
    caplog.set_level(logging.ERROR, logger="gateway.app")
    cases = [c for c in LIVE if c.key in ("mcp.heartbeat_s", "homeassistant.discovery_prefix", "northbound")]
    for case in cases:
        path.write_text(yaml.safe_dump(changed(case, base)))
        assert await gw.reload() is True, (case.id, caplog.text)
    assert "needs a restart" not in caplog.text
