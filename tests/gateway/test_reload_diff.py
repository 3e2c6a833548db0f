"""The reload diff's contract: which changes need a restart, which parts are rebuilt, and the one-line summary.

`Gateway.reload` acts on exactly what `diff` names, so a key it misses is a change silently not applied,
and a part it names wrongly is one rebuilt (or left running) for nothing.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import parse_config
from gateway.config.schema import Config
from gateway.reload import Changes, ConfigDiff, diff, restart_needed

TOKEN = "tok-0123456789abcdef"


def base() -> dict[str, Any]:
    """A config with every section a reload compares: two lines, two sinks, MCP with one device, HA, a simulator."""
    return {
        "gateway": {"id": "gw", "state_dir": "/tmp/fieldgate-diff", "http": None},
        "broker": {"listeners": ["tcp://127.0.0.1:1883"]},
        "northbound": [{"name": "local"}, {"name": "up", "url": "mqtt://upstream.example"}],
        "modbus": {
            "buses": [
                {"name": "l1", "port": "/dev/ttyA", "devices": [{"name": "x", "unit": 1, "points": [point("a")]}]},
                {"name": "l2", "port": "/dev/ttyB", "devices": [{"name": "y", "unit": 2, "points": [point("b")]}]},
            ]
        },
        "mcp": {"listen": "127.0.0.1:7720", "devices": [{"id": "m1", "token": TOKEN}]},
        "homeassistant": {"enabled": False},
        "simulator": {"modbus": [{"link": "/dev/ttyA", "devices": [{"unit": 1}]}]},
    }


def point(name: str, address: int = 0) -> dict[str, Any]:
    """A holding register point."""
    return {"name": name, "table": "holding", "address": address}


def build(data: dict[str, Any]) -> Config:
    """A validated config from its dict."""
    loaded = parse_config(yaml.safe_dump(data))
    assert loaded.config is not None
    return loaded.config


def changed(edit: Any) -> tuple[Config, Config]:
    """The base config, and a copy with `edit(data)` applied."""
    data = base()
    new = copy.deepcopy(data)
    edit(new)
    return build(data), build(new)


# Each restart-only key, changed alone, is named alone: one the gateway cannot take live.
RESTART_ONLY = [
    ("gateway.id", lambda d: d["gateway"].update(id="gw2")),
    ("gateway.state_dir", lambda d: d["gateway"].update(state_dir="/tmp/fieldgate-other")),
    ("gateway.http", lambda d: d["gateway"].update(http="127.0.0.1:9721")),
    ("gateway.log_level", lambda d: d["gateway"].update(log_level="DEBUG")),
    ("gateway.audit", lambda d: d["gateway"].update(audit={"backups": 7})),
    ("broker", lambda d: d["broker"].update(listeners=["tcp://127.0.0.1:1884"])),
    ("broker", lambda d: d["broker"].update(process="inline")),
    ("mcp", lambda d: d.pop("mcp")),
    ("mcp.listen", lambda d: d["mcp"].update(listen="127.0.0.1:7721")),
    ("mcp.tls", lambda d: d["mcp"].update(tls={"cert": "/etc/fg/c.pem", "key": "/etc/fg/k.pem"})),
    ("simulator", lambda d: d["simulator"]["modbus"][0]["devices"].append({"unit": 2})),
]


@pytest.mark.parametrize(("key", "edit"), RESTART_ONLY, ids=[f"{k}-{i}" for i, (k, _) in enumerate(RESTART_ONLY)])
def test_each_restart_only_key_changed_alone_is_named_alone(key: str, edit: Any) -> None:
    old, new = changed(edit)
    assert restart_needed(old, new) == [key]
    assert diff(old, new).restart_needed == [key]
    assert restart_needed(new, old) == [key]  # and back again


def test_an_mcp_section_added_needs_a_restart() -> None:
    without = base()
    del without["mcp"]
    assert restart_needed(build(without), build(base())) == ["mcp"]


def test_live_changes_need_no_restart() -> None:
    def edit(d: dict[str, Any]) -> None:
        d["modbus"]["buses"][0]["devices"][0]["points"].append(point("c", 4))
        d["northbound"].pop()
        d["mcp"]["devices"].append({"id": "m2", "token": TOKEN})
        d["mcp"]["heartbeat_s"] = 10
        d["homeassistant"]["enabled"] = True

    old, new = changed(edit)
    assert restart_needed(old, new) == []


def test_several_restart_keys_come_in_a_fixed_order() -> None:
    def edit(d: dict[str, Any]) -> None:
        d["gateway"].update(id="gw2", state_dir="/tmp/o", http="127.0.0.1:1", log_level="ERROR", audit={"backups": 2})
        d["broker"]["process"] = "inline"
        d["mcp"].update(listen="127.0.0.1:1", tls={"cert": "c", "key": "k"})
        d["simulator"] = None

    old, new = changed(edit)
    assert restart_needed(old, new) == [
        "gateway.id",
        "gateway.state_dir",
        "gateway.http",
        "gateway.log_level",
        "gateway.audit",
        "broker",
        "mcp.listen",
        "mcp.tls",
        "simulator",
    ]


def test_an_unchanged_config_changes_nothing() -> None:
    d = diff(build(base()), build(base()))
    assert d == ConfigDiff([], Changes(), Changes(), Changes(), Changes(), [])
    assert not (d.buses or d.sinks or d.devices or d.mcp_devices)
    assert d.summary() == "nothing changed"


def test_devices_added_removed_and_changed_are_named_by_kind() -> None:
    def edit(d: dict[str, Any]) -> None:
        buses = d["modbus"]["buses"]
        buses[0]["devices"].append({"name": "z", "unit": 2, "points": [point("c")]})  # added
        buses[1]["devices"] = []  # y removed
        buses[0]["devices"][0]["poll"] = "2s"  # x changed

    old, new = changed(edit)
    d = diff(old, new)
    assert (d.devices.added, d.devices.removed, d.devices.changed) == (["z"], ["y"], ["x"])
    assert d.buses == Changes(changed=["l1", "l2"])  # a line's devices are part of the line
    assert d.mcp_devices == Changes() and d.sinks == Changes()
    assert d.summary() == "+1 device (z), -1 device (y), ~1 device (x), bus l1 restarted, bus l2 restarted"


def test_a_device_moved_to_another_line_is_changed_even_if_its_own_settings_are_not() -> None:
    def edit(d: dict[str, Any]) -> None:
        buses = d["modbus"]["buses"]
        buses[1]["devices"].append(buses[0]["devices"].pop())

    old, new = changed(edit)
    assert diff(old, new).devices == Changes(changed=["x"])


def test_lines_added_and_removed() -> None:
    def edit(d: dict[str, Any]) -> None:
        d["modbus"]["buses"][1] = {"name": "l3", "port": "/dev/ttyC"}

    old, new = changed(edit)
    d = diff(old, new)
    assert d.buses == Changes(added=["l3"], removed=["l2"])
    assert d.summary() == "-1 device (y), bus l3 added, bus l2 removed"


def test_a_relative_line_port_is_compared_as_the_file_it_names() -> None:
    def relative(d: dict[str, Any]) -> None:
        d["modbus"]["buses"][0]["port"] = "./ttyA"

    old, new = changed(relative)
    same = build(new.model_dump(mode="json"))
    assert diff(same, new, Path("/etc/fg"), Path("/etc/fg")).buses == Changes()
    # The same text in a config file moved to another folder names another serial port.
    assert diff(same, new, Path("/etc/fg"), Path("/srv/fg")).buses == Changes(changed=["l1"])
    # ./ttyA next to /dev's config is /dev/ttyA: the same port as the absolute path.
    assert diff(old, new, None, Path("/dev")).buses == Changes()
    assert diff(old, new).buses == Changes(changed=["l1"])  # no folder given: compared as written


def test_sinks_added_removed_and_changed() -> None:
    def edit(d: dict[str, Any]) -> None:
        d["northbound"][1]["qos"] = 0
        d["northbound"].append({"name": "third", "url": "mqtt://other.example"})
        d["northbound"].pop(0)

    old, new = changed(edit)
    d = diff(old, new)
    assert d.sinks == Changes(added=["third"], removed=["local"], changed=["up"])
    assert d.summary() == "+1 sink (third), -1 sink (local), ~1 sink (up)"


def test_a_new_gateway_id_changes_the_topic_prefix_of_the_sinks_that_use_it() -> None:
    old, new = changed(lambda d: d["gateway"].update(id="gw2"))
    assert diff(old, new).sinks == Changes(changed=["local", "up"])  # both publish under fieldgate/<id>
    # With its own prefix, unchanged, a sink does not follow the id.
    data = base()
    data["northbound"][1]["topic_prefix"] = "site/up"
    moved = copy.deepcopy(data)
    moved["gateway"]["id"] = "gw3"
    assert diff(build(data), build(moved)).sinks == Changes(changed=["local"])


def test_mcp_devices_are_devices_and_mcp_devices() -> None:
    def edit(d: dict[str, Any]) -> None:
        d["mcp"]["devices"][0]["token"] = "tok-fedcba9876543210"
        d["mcp"]["devices"].append({"id": "m2", "token": TOKEN})

    old, new = changed(edit)
    d = diff(old, new)
    assert d.mcp_devices == Changes(added=["m2"], changed=["m1"])
    assert d.devices == Changes(added=["m2"], changed=["m1"])
    assert d.other == []  # the devices are not the session settings
    assert d.buses == Changes()


def test_the_mcp_section_removed_removes_its_devices() -> None:
    old, new = changed(lambda d: d.pop("mcp"))
    d = diff(old, new)
    assert d.mcp_devices == Changes(removed=["m1"]) and d.devices == Changes(removed=["m1"])
    assert d.other == []
    d = diff(new, old)
    assert d.mcp_devices == Changes(added=["m1"]) and d.other == []


def test_session_settings_and_home_assistant_are_applied_as_a_whole() -> None:
    def edit(d: dict[str, Any]) -> None:
        d["mcp"]["heartbeat_s"] = 10
        d["homeassistant"]["discovery_prefix"] = "ha"

    old, new = changed(edit)
    d = diff(old, new)
    assert d.other == ["homeassistant", "mcp settings"]
    assert d.restart_needed == [] and not d.devices
    assert d.summary() == "homeassistant updated, mcp settings updated"


def test_listen_and_tls_are_restarts_not_session_settings() -> None:
    old, new = changed(lambda d: d["mcp"].update(listen="127.0.0.1:7799"))
    assert diff(old, new).other == []
    old, new = changed(lambda d: d["mcp"].update(tls={"cert": "/etc/fg/c.pem", "key": "/etc/fg/k.pem"}))
    assert diff(old, new).other == []
    assert diff(old, new).restart_needed == ["mcp.tls"]


def test_changes_is_true_when_anything_is_in_it() -> None:
    assert not Changes()
    assert Changes(added=["a"])
    assert Changes(removed=["a"])
    assert Changes(changed=["a"])


def test_changes_summary_counts_with_the_right_plural() -> None:
    assert Changes().summary("device") == []
    one = Changes(added=["a"], removed=["b"], changed=["c"])
    assert one.summary("device") == ["+1 device (a)", "-1 device (b)", "~1 device (c)"]
    two = Changes(added=["a", "b"], removed=["c", "d", "e"], changed=["f", "g"])
    assert two.summary("sink") == ["+2 sinks (a, b)", "-3 sinks (c, d, e)", "~2 sinks (f, g)"]
