"""`fieldgate check` on Sparkplug sinks, beyond tests/config_cases/sparkplug_check_*: what is and is not one broker,
and that the Sparkplug-only warnings stay out of configs without a sparkplug sink."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.config import parse_config
from gateway.config.checks_sparkplug import broker_key
from gateway.errors import ConfigError

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
