"""`fieldgate check` on Sparkplug sinks, beyond tests/config_cases/sparkplug_check_*: what is and is not one broker,
that the Sparkplug-only warnings stay out of configs without a sparkplug sink, and, on the real embedded broker
(amqtt), what the warning about its users' access rests on: the default access drops a host's STATE, an acl that
names the node's topics lets a host birth and rebirth the node."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.broker_users import hash_password
from bridge.sparkplug import sparkplug_b_pb2 as pb
from gateway.app import Gateway
from gateway.config import load_config, parse_config
from gateway.config.checks_sparkplug import broker_key
from gateway.errors import ConfigError

from configs import broker, config, sink, write
from helpers import free_port, until

CASE_CLASHES = """\
    homeassistant: {enabled: true}
    northbound:
      - name: local
    modbus:
      buses:
        - name: line
          port: /dev/ttyUSB0
          devices:
            - name: Pump
              unit: 1
              points: [{name: Flow, table: input, address: 0}, {name: flow, table: input, address: 1}]
            - {name: pump, unit: 2, points: [{name: t, table: input, address: 0}]}
    """


def _warnings(text: str) -> list[str]:
    return parse_config(textwrap.dedent(text), "cfg.yaml", env={}).warnings


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("mqtt://Broker.Example", "mqtt://broker.example:1883"),
        ("mqtt://broker.example/", "mqtt://broker.example"),
        ("mqtts://broker.example", "mqtts://broker.example:8883"),
    ],
)
def test_one_broker_written_two_ways_is_one_broker(a: str, b: str) -> None:
    """A host name in another case, a default port written out, a trailing slash: still the same broker."""
    assert broker_key(a) == broker_key(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("mqtt://broker.example", "mqtts://broker.example"),
        ("mqtt://broker.example", "mqtt://broker.example:1884"),
        ("mqtt://broker.example", None),
        ("mqtt://a.example", "mqtt://b.example"),
    ],
)
def test_other_schemes_ports_or_hosts_are_other_brokers(a: str, b: str | None) -> None:
    """mqtt:// and mqtts:// default to different ports; the embedded broker is none of the upstream ones."""
    assert broker_key(a) != broker_key(b)


def test_without_a_sparkplug_sink_names_differing_in_case_are_not_warned_about() -> None:
    """The case rule is Sparkplug's: JSON topics tell `Pump` from `pump`, so a JSON-only config gets no warning."""
    assert _warnings(CASE_CLASHES) == []


def test_with_a_sparkplug_sink_the_same_names_are_warned_about() -> None:
    """The same devices and points with a sparkplug sink added: one warning for the ids, one for the metrics."""
    text = CASE_CLASHES.replace(
        "  - name: local\n",
        "  - name: local\n      - {name: scada, format: sparkplug, sparkplug: {group_id: plant1}}\n",
    )
    warnings = _warnings(text)
    assert len(warnings) == 2, warnings
    assert "metrics 'Flow' and 'flow' of device 'Pump' differ only in case" in warnings[0]
    assert "Sparkplug device ids 'Pump' (line 10) and 'pump' differ only in case" in warnings[1]


def test_two_edge_nodes_apart_by_group_are_fine_and_the_same_pair_twice_is_refused() -> None:
    """One gateway may be two edge nodes on one broker under two groups; the same pair twice is a config error."""
    text = """\
    gateway: {id: gw1}
    northbound:
      - {name: a, url: mqtt://h, format: sparkplug, sparkplug: {group_id: g1}}
      - {name: b, url: mqtt://h, format: sparkplug, sparkplug: {group_id: g2}}
    """
    assert _warnings(text) == []
    with pytest.raises(ConfigError) as info:
        _warnings(text.replace("group_id: g2", "group_id: g1, edge_node_id: gw1"))
    assert len(info.value.errors) == 1
    assert "sink 'b' is Sparkplug edge node g1/gw1 on mqtt://h:1883, as sink 'a' is (line 3)" in info.value.errors[0]


def test_every_sparkplug_key_is_in_the_readmes_sparkplug_table() -> None:
    """The README's Sparkplug section has a row for `format` and each key of the `sparkplug` section."""
    from gateway.config.schema import SparkplugConfig

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Sparkplug B (Ignition and other SCADA hosts)", 1)[1].split("\n## ", 1)[0]
    rows = {row.split("|")[1].strip().strip("`") for row in section.splitlines() if row.startswith("| `")}
    expected = {"format"} | {f"sparkplug.{key}" for key in SparkplugConfig.model_fields}
    assert expected - rows == set(), "keys the README's Sparkplug table does not name"


# --- the embedded broker's access, on the real broker: what the warning about it rests on -------------------------

HOST_PASSWORD = "host-password-1234"
NODE = {"group_id": "plant1", "edge_node_id": "line-a", "primary_host": "h1"}
MARKER = "fieldgate/gw1/x/set/y"  # a topic every user may publish under the default access: its echo orders the test


def _rebirth() -> bytes:
    payload = pb.Payload(timestamp=1, seq=0)
    m = payload.metrics.add()
    m.name, m.datatype, m.boolean_value = "Node Control/Rebirth", pb.DataType.Value("Boolean"), True
    return payload.SerializeToString()


async def _host_session(tmp_path: Path, acl: dict[str, object] | None) -> tuple[list[str], list[str]]:
    """Run the gateway with a sparkplug sink on its embedded broker (users, `acl`); a host logs in as `host`,
    publishes its STATE online, asks for a rebirth and publishes MARKER. (`fieldgate check`'s warnings, topics seen.)"""
    port = free_port()
    (tmp_path / "users").write_text(f"host:{hash_password(HOST_PASSWORD)}\n")
    cfg = config(
        id="gw1",
        state_dir=tmp_path / "state",
        broker=broker(port, process="inline", users="users", **({"acl": acl} if acl else {})),
        northbound=[sink("scada", format="sparkplug", sparkplug=NODE)],
    )
    loaded = load_config(write(cfg, tmp_path))
    seen: list[str] = []
    host = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="host-h1")
    host.username_pw_set("host", HOST_PASSWORD)
    host.on_message = lambda _c, _u, m: seen.append(m.topic)
    subscribed: list[object] = []
    host.on_connect = lambda c, *_: c.subscribe([("spBv1.0/#", 1), ("fieldgate/#", 1)])
    host.on_subscribe = lambda _c, _u, _mid, codes, _p: subscribed.extend(codes)
    gw = Gateway(loaded)
    await gw.start()
    try:
        await asyncio.to_thread(host.connect, "127.0.0.1", port)
        host.loop_start()
        await until(lambda: subscribed, what="the host's SUBACK")
        assert all(not code.is_failure for code in subscribed), subscribed  # type: ignore[attr-defined]
        state = json.dumps({"online": True, "timestamp": 1796650000000}).encode()
        host.publish("spBv1.0/STATE/h1", state, qos=1, retain=True)
        # The node is born, and a rebirth request is taken.
        await until(lambda: seen.count("spBv1.0/plant1/NBIRTH/line-a") == 1, what="the NBIRTH after STATE")
        host.publish("spBv1.0/plant1/NCMD/line-a", _rebirth(), qos=1)
        await until(lambda: seen.count("spBv1.0/plant1/NBIRTH/line-a") == 2, what="the NBIRTH of the rebirth")
        host.publish(MARKER, b"1", qos=1)
        await until(lambda: MARKER in seen, what="the marker's echo")
    finally:
        host.loop_stop()
        host.disconnect()
        await gw.stop()
    return loaded.warnings, seen


async def test_the_default_access_lets_a_host_publish_state_and_commands_of_a_sparkplug_sink(tmp_path: Path) -> None:
    """With users and no acl any user may publish the primary host's STATE and the node's NCMD/DCMD (else the
    sink would never birth): the host's STATE births the node, an NCMD rebirths it; no warning."""
    warnings, seen = await _host_session(tmp_path, None)
    assert seen.count("spBv1.0/plant1/NBIRTH/line-a") == 2, seen
    assert warnings == [], warnings


async def test_a_host_the_acl_lets_publish_state_and_commands_births_the_node_on_amqtt(tmp_path: Path) -> None:
    """With an acl naming the node's topics the host's STATE births the node on amqtt, an NCMD rebirths it: no
    warning."""
    writes = ["spBv1.0/STATE/h1", "spBv1.0/plant1/NCMD/line-a", "spBv1.0/plant1/DCMD/line-a/+", MARKER]
    warnings, seen = await _host_session(tmp_path, {"host": {"read": ["spBv1.0/#", "fieldgate/#"], "write": writes}})
    assert seen.count("spBv1.0/plant1/NBIRTH/line-a") == 2
    assert warnings == []
