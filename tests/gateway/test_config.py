"""The config loader: YAML with line numbers, ${ENV} substitution, every error at once, cross-checks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from drivers.mcp.payload import VALUE_NAME
from gateway.config import Config, Loaded, find_config, load_config, parse_config
from gateway.config.schema import BusConfig, PointConfig, SinkConfig
from gateway.config.settings import point_codec
from gateway.errors import ConfigError
from gateway.types import TOPIC_NAME


def load(text: str, env: dict[str, str] | None = None) -> Loaded:
    return parse_config(textwrap.dedent(text), "cfg.yaml", env=env or {})


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text, env)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


FULL = """\
gateway:
  id: plant-7
  state_dir: /tmp/fieldgate
  log_level: DEBUG
  http: 127.0.0.1:9720
broker:
  enabled: true
  listeners: [tcp://0.0.0.0:1883, ws://127.0.0.1:8080]
  users: /etc/fieldgate/users
northbound:
  - name: local
  - name: cloud
    url: mqtts://broker.example.com:8883
    client_id: plant-7
    username: gw
    password: ${CLOUD_PASS}
    qos: 0
    keepalive: 1m
    spool: {max_size: 64MB, max_age: 5m, when_full: reject}
    topic_prefix: acme/plant-7
modbus:
  templates:
    pzem:
      - {name: voltage, table: input, address: 0, scale: 0.1, unit: V}
      - {name: energy, table: input, address: 5, type: uint32, unit: Wh}
      - {name: alarm, table: coil, address: 2}
  buses:
    - name: rs485
      port: /dev/ttyUSB0
      baudrate: 19200
      parity: N
      stopbits: 2
      timeout: 250ms
      devices:
        - name: meter1
          unit: 1
          poll: 250ms
          template: pzem
        - name: meter2
          unit: 2
          full_every: 5m
          template: pzem
          points:
            - {name: alarm, table: coil, address: 3, writable: true}
            - name: status
              table: holding
              address: 10
              type: bitfield
              bits: {0: running, 3: fault}
        - name: boiler
          unit: 3
          max_registers: 4
          points:
            - {name: setpoint, table: holding, address: 0, type: float32, writable: true, min: 5, max: 90}
            - {name: label, table: holding, address: 8, type: "string:8"}
mcp:
  listen: 127.0.0.1:7720
  ack_timeout: 500ms
  max_payload: 2MB
  devices:
    - {id: pump-1, token: "${PUMP_TOKEN:-changeme-changeme}", meta: {room: basement}}
homeassistant:
  enabled: true
simulator:
  modbus:
    - link: /dev/ttyUSB0
      devices:
        - unit: 1
          values:
            voltage: {wave: sine, min: 220, max: 240, period: 1m}
        - unit: 3
          dead: true
"""


# --- a valid config -----------------------------------------------------------------------------


def test_full_config_gives_typed_objects() -> None:
    loaded = load(FULL, {"CLOUD_PASS": "pa55"})
    cfg = loaded.config
    assert isinstance(cfg, Config)
    assert loaded.path == "cfg.yaml"
    assert loaded.warnings == []  # 0.0.0.0 is fine: broker.users is set
    assert cfg.gateway.id == "plant-7" and cfg.gateway.log_level == "DEBUG"
    assert cfg.broker.listeners == ["tcp://0.0.0.0:1883", "ws://127.0.0.1:8080"]

    local, cloud = cfg.northbound
    assert isinstance(cloud, SinkConfig)
    assert local.url is None and cfg.prefix_for(local) == "fieldgate/plant-7"
    assert cloud.password == "pa55"
    assert cloud.qos == 0 and cloud.keepalive == 60.0
    assert cloud.spool.max_size == 64 * 1024 * 1024
    assert cloud.spool.max_age == 300.0
    assert cloud.spool.when_full == "reject"

    (bus,) = cfg.modbus.buses
    assert isinstance(bus, BusConfig)
    assert (bus.baudrate, bus.parity, bus.stopbits, bus.timeout) == (19200, "N", 2, 0.25)
    meter1, meter2, _ = bus.devices
    assert meter1.poll == 0.25 and meter1.full_every == 60.0
    assert meter2.full_every == 300.0

    assert cfg.mcp is not None
    assert cfg.mcp.ack_timeout == 0.5 and cfg.mcp.max_payload == 2 * 1024 * 1024
    assert cfg.mcp.devices[0].token == "changeme-changeme"
    assert cfg.mcp.devices[0].meta == {"room": "basement"}
    assert cfg.homeassistant.enabled is True
    assert cfg.simulator is not None
    assert cfg.simulator.modbus[0].devices[0].values["voltage"].period == 60.0


def test_template_points_are_copied_into_each_device() -> None:
    bus = load(FULL, {"CLOUD_PASS": "x"}).config.modbus.buses[0]
    meter1, meter2, boiler = bus.devices
    assert [p.name for p in meter1.points] == ["voltage", "energy", "alarm"]
    # The device's own `alarm` replaces the template's in place; its own new points follow.
    assert [p.name for p in meter2.points] == ["voltage", "energy", "alarm", "status"]
    assert meter2.points[2].address == 3 and meter2.points[2].writable
    assert meter1.points[2].address == 2 and not meter1.points[2].writable
    # Deep copies: no device shares a point object with another or with the template.
    template = bus.devices[0].points[0]
    assert template is not meter2.points[0]
    assert meter1.points[0] is not load(FULL, {"CLOUD_PASS": "x"}).config.modbus.templates["pzem"][0]
    meter1.points[0].unit = "kV"
    assert meter2.points[0].unit == "V"
    assert all(isinstance(p, PointConfig) for p in meter2.points)
    assert point_codec(meter1.points[1]).count == 2 and point_codec(meter1.points[0]).scale == 0.1
    assert point_codec(meter2.points[3]).bits == ((0, "running"), (3, "fault"))
    assert [point_codec(p).count for p in boiler.points] == [2, 4]


def test_empty_file_means_all_defaults() -> None:
    for text in ("", "# nothing yet\n", "~\n"):
        cfg = load(text).config
        assert cfg.broker.enabled and cfg.broker.listeners == ["tcp://127.0.0.1:1883"]
        assert [s.name for s in cfg.northbound] == ["local"]
        assert cfg.modbus.buses == [] and cfg.mcp is None and cfg.simulator is None


def test_yaml_scalars_resolve_like_safe_loader() -> None:
    cfg = load(
        """\
        gateway: {id: "007", http: null}
        modbus:
          buses:
            - name: b
              port: /dev/ttyS0
              baudrate: 0x2580
              devices:
                - name: d
                  unit: 1
                  points:
                    - {name: p, table: coil, address: 0, writable: yes}
                    - {name: q, table: holding, address: 1, scale: 1e-1}
        """
    ).config
    assert cfg.gateway.id == "007" and cfg.gateway.http is None
    bus = cfg.modbus.buses[0]
    assert bus.baudrate == 9600
    assert bus.devices[0].points[0].writable is True
    assert bus.devices[0].points[1].scale == 0.1


def test_anchors_and_merge_keys_work() -> None:
    cfg = load(
        """\
        modbus:
          buses:
            - name: b
              port: /dev/ttyS0
              devices:
                - &dev {name: d1, unit: 1, poll: 2s, points: [{name: p, table: holding, address: 0}]}
                - <<: *dev
                  name: d2
                  unit: 2
        """
    ).config
    d1, d2 = cfg.modbus.buses[0].devices
    assert (d2.name, d2.unit, d2.poll, d2.points[0].name) == ("d2", 2, 2.0, "p")
    assert d1.points[0] is not d2.points[0]


# --- every error at once ---------------------------------------------------------------------


MISTAKES = """\
gateway:
  id: gw
modbus:
  templates:
    pzem:
      - {name: voltage, table: input, address: 0}
  buses:
    - name: rs485
      port: /dev/ttyUSB0
      baudrat: 9600
      parity: X
      timeout: 5 seconds
      devices:
        - name: meter1
          unit: 300
          template: pzem
        - name: meter2
          unit: 2
          template: pzm
        - name: meter2
          unit: 3
          points:
            - {name: relay, table: coil, address: 0, type: int16}
            - {name: temp, table: holding, address: 1, type: float64}
          max_registers: 2
"""


def test_all_mistakes_are_reported_sorted_with_lines_and_paths() -> None:
    assert errors_of(MISTAKES) == [
        "cfg.yaml:10: modbus.buses[0].baudrat: unknown key 'baudrat' (did you mean 'baudrate'?)",
        "cfg.yaml:11: modbus.buses[0].parity: must be one of 'N', 'E', 'O', got 'X'",
        ("cfg.yaml:12: modbus.buses[0].timeout: '5 seconds' is not a duration (use e.g. 250ms, 1s, 5m, 7d)"),
        "cfg.yaml:15: modbus.buses[0].devices[0].unit: must be at most 247, got 300",
        ("cfg.yaml:19: modbus.buses[0].devices[1].template: unknown template 'pzm' (did you mean 'pzem'?)"),
        ("cfg.yaml:20: modbus.buses[0].devices[2].name: device name 'meter2' is used twice (first at line 17)"),
        (
            "cfg.yaml:23: modbus.buses[0].devices[2].points[0]: "
            "a coil point is a single bit: type must be bool, not int16"
        ),
        (
            "cfg.yaml:24: modbus.buses[0].devices[2].points[1].type: point 'temp' is float64: "
            "4 registers, more than max_registers 2 of device 'meter2'"
        ),
    ]


def test_missing_required_keys_point_at_their_parent() -> None:
    assert errors_of(
        """\
        modbus:
          buses:
            - name: b
              devices:
                - name: d
                  points: [{name: p, table: holding, address: 70000}]
        """
    ) == [
        "cfg.yaml:3: modbus.buses[0].port: is required but missing",
        "cfg.yaml:5: modbus.buses[0].devices[0].unit: is required but missing",
        "cfg.yaml:6: modbus.buses[0].devices[0].points[0].address: must be at most 65535, got 70000",
    ]


def test_unknown_keys_hint_or_list_the_known_ones() -> None:
    assert errors_of("gatewy: {}\nnonsense: 1\nbroker: {enabeld: false}\n") == [
        "cfg.yaml:1: gatewy: unknown key 'gatewy' (did you mean 'gateway'?)",
        (
            "cfg.yaml:2: nonsense: unknown key 'nonsense' (expected one of: gateway, broker, "
            "northbound, modbus, mcp, homeassistant, simulator)"
        ),
        "cfg.yaml:3: broker.enabeld: unknown key 'enabeld' (did you mean 'enabled'?)",
    ]


def test_type_errors_are_short_and_name_the_value() -> None:
    assert errors_of(
        """\
        gateway: 5
        broker:
        northbound:
          - name: x
            qos: "1"
            password: 1234
            spool: {max_size: lots}
        homeassistant: {enabled: maybe}
        """
    ) == [
        "cfg.yaml:1: gateway: expected a mapping (key: value), got 5",
        "cfg.yaml:2: broker: is empty: expected a mapping of keys (fill it in or remove it)",
        "cfg.yaml:5: northbound[0].qos: must be one of 0, 1, got '1'",
        "cfg.yaml:6: northbound[0].password: expected a string, got (hidden) (put it in quotes)",
        "cfg.yaml:7: northbound[0].spool.max_size: 'lots' is not a size (use e.g. 512kB, 64MB, 1GB)",
        "cfg.yaml:8: homeassistant.enabled: expected true or false, got 'maybe'",
    ]


def test_union_values_get_one_message() -> None:
    assert errors_of(
        """\
        modbus:
          buses:
            - name: b
              port: /dev/ttyS0
              devices:
                - name: d
                  unit: 1
                  points:
                    - {name: f, table: holding, address: 1, type: bitfield, bits: 5}
                    - {name: g, table: holding, address: 2, type: bitfield, bits: {x: a}}
        """
    ) == [
        "cfg.yaml:9: modbus.buses[0].devices[0].points[0].bits: expected a mapping or a list, got 5",
        "cfg.yaml:10: modbus.buses[0].devices[0].points[1].bits.x: key 'x': expected an integer",
    ]


def test_root_must_be_a_mapping() -> None:
    assert errors_of("- a\n- b\n") == ["cfg.yaml:1: (top level): expected a mapping (key: value), got a list"]


# --- YAML level -------------------------------------------------------------------------------


def test_yaml_syntax_error_is_one_line() -> None:
    assert errors_of("gateway:\n  id: gw\n  log_level: INFO\n   http: x\n") == [
        "cfg.yaml:4: yaml: mapping values are not allowed here"
    ]


def test_unclosed_quote_names_where_it_started() -> None:
    assert errors_of('gateway:\n  id: "gw\n') == [
        ("cfg.yaml:3: yaml: found unexpected end of stream (while scanning a quoted scalar started at line 2)")
    ]


def test_duplicate_keys_are_errors() -> None:
    assert errors_of("gateway:\n  id: a\n  log_level: INFO\n  id: b\n") == [
        "cfg.yaml:4: gateway.id: duplicate key 'id' (first at line 2)"
    ]


def test_unsupported_tags_and_recursive_aliases() -> None:
    assert errors_of("gateway:\n  id: !secret x\nmodbus: &m\n  buses: [*m]\n") == [
        "cfg.yaml:2: gateway.id: unsupported YAML tag '!secret'",
        # An alias has no position of its own after composing: the anchor's line is used.
        "cfg.yaml:3: modbus.buses[0]: recursive alias: a node cannot contain itself",
    ]


# --- environment -------------------------------------------------------------------------------


def test_env_substitution_and_defaults() -> None:
    cfg = load(
        """\
        gateway: {id: "${SITE}-gw", state_dir: "${STATE:-/srv/fg}"}
        northbound:
          - {name: up, url: "mqtt://${HOST}:1883", password: "${PASS}", client_id: "$${LITERAL}"}
        modbus:
          buses:
            - {name: b, port: "${PORT}", baudrate: "${BAUD}"}
        """,
        {
            "SITE": "north",
            "HOST": "10.0.0.5",
            "PASS": "pa:ss",
            "PORT": "/dev/ttyS1",
            "BAUD": "19200",
        },
    ).config
    assert cfg.gateway.id == "north-gw" and cfg.gateway.state_dir == "/srv/fg"
    sink = cfg.northbound[0]
    assert (sink.url, sink.password, sink.client_id) == (
        "mqtt://10.0.0.5:1883",
        "pa:ss",
        "${LITERAL}",
    )
    assert cfg.modbus.buses[0].port == "/dev/ttyS1" and cfg.modbus.buses[0].baudrate == 19200


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FG_TEST_SITE", "from-os")
    cfg = parse_config("gateway: {id: '${FG_TEST_SITE}'}\n")
    assert cfg.config.gateway.id == "from-os"


def test_unset_variable_is_an_error_at_its_line() -> None:
    assert errors_of(
        """\
        gateway:
          id: gw
        northbound:
          - name: up
            url: mqtt://broker
            password: ${DB_PASS}
            username: ${USER_NAME:-}
            client_id: ${BAD-NAME}
        """,
        {"USER_NAME": ""},
    ) == [
        "cfg.yaml:6: northbound[0].password: environment variable DB_PASS is not set",
        ("cfg.yaml:8: northbound[0].client_id: bad variable reference '${BAD-NAME}': use ${NAME} or ${NAME:-default}"),
    ]


def test_secrets_from_env_never_appear_in_errors() -> None:
    secret = "hunter2-XYZ"
    env = {"SECRET": secret, "SITE": secret}
    errors = errors_of(
        """\
        gateway:
          id: "${SITE} x"
        broker:
          listeners: ["tcp://${SECRET}:1883"]
        northbound:
          - name: up
            url: "http://user:${SECRET}@host"
            password: ${SECRET}
          - name: up2
            url: "mqtt://${SECRET}"
            spool: {max_size: "${SECRET}"}
            qos: ${SECRET}
        """,
        env,
    )
    assert errors == [
        (
            "cfg.yaml:2: gateway.id: '${SITE} x' is not a topic-safe name: 1-64 of A-Z a-z 0-9 _ . - "
            "(no '/', '+', '#', spaces, and not starting with '$', '.' or '-')"
        ),
        "cfg.yaml:6: northbound[0]: url must not carry credentials: give them as `username` and `password`",
        ("cfg.yaml:11: northbound[1].spool.max_size: '${SECRET}' is not a size (use e.g. 512kB, 64MB, 1GB)"),
        "cfg.yaml:12: northbound[1].qos: must be one of 0, 1, got '${SECRET}'",
    ]
    assert not any(secret in e or "hunter2" in e for e in errors)


def test_secrets_from_env_stay_out_of_cross_check_errors() -> None:
    errors = errors_of(
        """\
        modbus:
          buses:
            - name: a
              port: "${PORT}"
              devices: [{name: "${DEV}", unit: 1, points: [{name: p, table: coil, address: 0}]}]
            - name: b
              port: /dev/ttyS7
              devices: [{name: "${DEV}", unit: 1, points: [{name: p, table: coil, address: 0}]}]
        simulator:
          modbus: [{link: "${PORT}"}, {link: "${PORT}"}]
        """,
        {"DEV": "vault-7", "PORT": "/dev/hidden"},
    )
    assert errors == [
        ("cfg.yaml:8: modbus.buses[1].devices[0].name: device name '${DEV}' is used twice (first at line 5)"),
        ("cfg.yaml:10: simulator.modbus[1].link: link '${PORT}' is used by two simulated lines (first at line 10)"),
    ]


def test_short_substituted_values_are_hidden_without_garbling_messages() -> None:
    assert errors_of('northbound:\n  - name: x\n    spool: {max_size: "${S}"}\n', {"S": "e"}) == [
        "cfg.yaml:3: northbound[0].spool.max_size: '${S}' is not a size (use e.g. 512kB, 64MB, 1GB)"
    ]


def test_secrets_from_env_never_appear_in_warnings() -> None:
    loaded = load("broker:\n  listeners: ['tcp://${BIND}:1883']\n", {"BIND": "10.1.2.3"})
    assert loaded.warnings == ["cfg.yaml:2: broker.listeners[0]: listens on ${BIND}:1883 without authentication"]


# --- cross-checks ------------------------------------------------------------------------------


def test_names_ports_and_units_must_be_unique() -> None:
    assert errors_of(
        """\
        northbound:
          - {name: local}
          - {name: local, url: "mqtt://h"}
        modbus:
          buses:
            - name: a
              port: /dev/ttyS0
              devices:
                - {name: d1, unit: 1, points: [{name: p, table: coil, address: 0}]}
                - name: d2
                  unit: 1
                  points:
                    - {name: p, table: coil, address: 0}
                    - {name: p, table: coil, address: 1}
            - name: a
              port: /dev/ttyS0
              devices:
                - {name: d1, unit: 1, points: [{name: p, table: coil, address: 0}]}
                - {name: empty, unit: 2}
        mcp:
          devices:
            - {id: d2, token: token-0123456789}
            - {id: m, token: token-0123456789}
            - {id: m, token: token-0123456789}
        """
    ) == [
        "cfg.yaml:3: northbound[1].name: sink name 'local' is used twice (first at line 2)",
        ("cfg.yaml:11: modbus.buses[0].devices[1].unit: unit 1 is used twice on bus 'a' (first at line 9)"),
        (
            "cfg.yaml:14: modbus.buses[0].devices[1].points[1].name: point name 'p' is used twice "
            "in device 'd2' (first at line 13)"
        ),
        "cfg.yaml:15: modbus.buses[1].name: bus name 'a' is used twice (first at line 6)",
        "cfg.yaml:16: modbus.buses[1].port: port '/dev/ttyS0' is used by two buses (first at line 7)",
        ("cfg.yaml:18: modbus.buses[1].devices[0].name: device name 'd1' is used twice (first at line 9)"),
        ("cfg.yaml:19: modbus.buses[1].devices[1]: device 'empty' has no points (give it `points:` or a `template:`)"),
        "cfg.yaml:22: mcp.devices[0].id: id 'd2' is already the name of a Modbus device (line 10)",
        "cfg.yaml:24: mcp.devices[2].id: MCP device id 'm' is used twice (first at line 23)",
    ]


def test_template_point_too_big_for_device_requests() -> None:
    assert errors_of(
        """\
        modbus:
          templates:
            big: [{name: total, table: holding, address: 0, type: uint64}]
          buses:
            - name: a
              port: /dev/ttyS0
              devices:
                - name: d
                  unit: 1
                  template: big
                  max_registers: 3
                - name: e
                  unit: 2
                  points: [{name: tail, table: input, address: 65535, type: float32}]
        """
    ) == [
        (
            "cfg.yaml:11: modbus.buses[0].devices[0].max_registers: point 'total' (from template "
            "'big') is uint64: 4 registers, more than max_registers 3 of device 'd'"
        ),
        (
            "cfg.yaml:14: modbus.buses[0].devices[1].points[0].address: point 'tail' at address "
            "65535 runs past register 65535 (2 registers)"
        ),
    ]


def test_unknown_template_without_any_templates() -> None:
    assert errors_of(
        """\
        modbus:
          buses:
            - name: a
              port: /dev/ttyS0
              devices: [{name: d, unit: 1, template: pzem}]
        """
    ) == [
        ("cfg.yaml:5: modbus.buses[0].devices[0].template: unknown template 'pzem' (no modbus.templates are declared)")
    ]


def test_embedded_broker_sink_needs_the_broker() -> None:
    assert errors_of("broker: {enabled: false}\n") == [
        (
            "cfg.yaml:1: broker.enabled: the default sink 'local' publishes to the embedded broker: "
            "enable it or list `northbound:` sinks with a url"
        )
    ]
    assert errors_of("broker:\n  enabled: false\nnorthbound:\n  - name: here\n  - name: there\n    url: null\n") == [
        (
            "cfg.yaml:4: northbound[0]: sink 'here' publishes to the embedded broker (no url) "
            "but broker.enabled is false"
        ),
        (
            "cfg.yaml:6: northbound[1].url: sink 'there' publishes to the embedded broker (no url) "
            "but broker.enabled is false"
        ),
    ]
    assert load("broker: {enabled: false}\nnorthbound: [{name: c, url: 'mqtt://h'}]\n")


SIM = """\
modbus:
  templates:
    meter: [{name: voltage, table: input, address: 0}]
  buses:
    - name: a
      port: /tmp/ttyV0
      devices:
        - {name: m1, unit: 1, template: meter}
        - {name: m2, unit: 2, points: [{name: temperature, table: holding, address: 0}]}
simulator:
  modbus:
    - link: /tmp/./ttyV0
      devices:
        - unit: 1
          values: {voltage: {wave: sine}, current: {value: 3}}
        - unit: 2
          values:
            temprature: {value: 21.5}
        - unit: 9
          values: {x: {value: 1}}
        - unit: 8
    - link: /tmp/ttyV9
      devices: [{unit: 1}]
"""


def test_simulator_values_must_name_points_of_the_polled_device() -> None:
    assert errors_of(SIM) == [
        (
            "cfg.yaml:15: simulator.modbus[0].devices[0].values.current: device 'm1' (unit 1) "
            "has no point 'current' (points: voltage)"
        ),
        (
            "cfg.yaml:18: simulator.modbus[0].devices[1].values.temprature: device 'm2' (unit 2) "
            "has no point 'temprature' (did you mean 'temperature'?)"
        ),
        ("cfg.yaml:19: simulator.modbus[0].devices[2].unit: bus 'a' has no device with unit 9 (units there: 1, 2)"),
    ]


def test_simulator_line_without_a_bus_is_only_a_warning() -> None:
    fixed = SIM.replace(", current: {value: 3}", "").replace("temprature", "temperature")
    fixed = fixed.replace("        - unit: 9\n          values: {x: {value: 1}}\n", "")
    assert load(fixed).warnings == [
        (
            "cfg.yaml:19: simulator.modbus[0].devices[2].unit: bus 'a' has no device with unit 8 "
            "(units there: 1, 2): nothing polls this simulated device"
        ),
        (
            "cfg.yaml:20: simulator.modbus[1].link: no modbus bus has port '/tmp/ttyV9': "
            "nothing polls this simulated line"
        ),
    ]


def test_listening_beyond_loopback_without_users_warns() -> None:
    text = textwrap.dedent(
        """\
        broker:
          listeners:
            - tcp://0.0.0.0:1883
            - ws://[::]:8080
            - tcp://127.0.0.2:1884
            - tcp://localhost:1885
            - tcp://[::1]:1886
        mcp: {}
        """
    )
    assert load(text).warnings == [
        "cfg.yaml:3: broker.listeners[0]: listens on 0.0.0.0:1883 without authentication",
        "cfg.yaml:4: broker.listeners[1]: listens on [::]:8080 without authentication",
        "cfg.yaml:8: mcp.listen: listens on 0.0.0.0:7720 without TLS: device tokens travel in clear",
    ]
    with_users = text.replace("broker:\n", "broker:\n  users: /etc/fieldgate/users\n")
    assert load(with_users).warnings == [
        "cfg.yaml:9: mcp.listen: listens on 0.0.0.0:7720 without TLS: device tokens travel in clear"
    ]
    with_tls = with_users.replace("mcp: {}", "mcp: {tls: {cert: c.pem, key: k.pem}}")
    assert load(with_tls).warnings == []
    assert load("broker:\n  listeners: [tcp://127.0.0.1:1883]\n").warnings == []


def test_listen_addresses_must_be_host_port() -> None:
    assert errors_of("gateway: {http: 'localhost'}\nmcp: {listen: '0.0.0.0:99999'}\n") == [
        "cfg.yaml:1: gateway.http: 'localhost' is not HOST:PORT (e.g. 127.0.0.1:9720)",
        "cfg.yaml:2: mcp.listen: '0.0.0.0:99999' is not HOST:PORT (e.g. 0.0.0.0:7720)",
    ]


# --- files ----------------------------------------------------------------------------------------


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("gateway:\n  id: filed\n  log_level: LOUD\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.errors == [
        f"{path}:3: gateway.log_level: must be one of 'DEBUG', 'INFO', 'WARNING', 'ERROR', got 'LOUD'"
    ]
    path.write_text("gateway:\n  id: filed\n")
    loaded = load_config(str(path), env={})
    assert loaded.config.gateway.id == "filed" and loaded.path == str(path)


def test_load_config_unreadable(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.errors == [f"{missing}: cannot read config: No such file or directory"]
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"gateway:\n  id: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert info.value.errors == [f"{bad}:2: yaml: not UTF-8 text (invalid continuation byte)"]


def test_find_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = tmp_path / "mine.yaml"
    explicit.write_text("")
    assert find_config(str(explicit)) == str(explicit)
    with pytest.raises(ConfigError, match="no such config file"):
        find_config(str(tmp_path / "other.yaml"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("gateway.config.loader.DEFAULT_LOCATIONS", ("./config.yaml", str(tmp_path / "etc.yaml")))
    with pytest.raises(ConfigError, match="no config file: tried ./config.yaml"):
        find_config(None)
    (tmp_path / "etc.yaml").write_text("")
    assert find_config(None) == str(tmp_path / "etc.yaml")
    (tmp_path / "config.yaml").write_text("")
    assert find_config(None) == "./config.yaml"


def test_any_single_line_removed_gives_a_config_or_clean_errors() -> None:
    lines = FULL.splitlines()
    for i in range(len(lines)):
        text = "\n".join(lines[:i] + lines[i + 1 :]) + "\n"
        try:
            parse_config(text, "cfg.yaml", env={"CLOUD_PASS": "pa55-word"})
        except ConfigError as exc:
            assert exc.errors, i
            lines_reported = [int(e.split(":")[1]) for e in exc.errors]
            assert lines_reported == sorted(lines_reported)
            for error in exc.errors:
                assert error.startswith("cfg.yaml:") and "pa55-word" not in error, error


def test_a_key_that_looks_like_a_broken_number_is_an_unknown_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("gateway:\n  0b_: 1\n", "c.yaml")
    assert info.value.errors == [
        "c.yaml:2: gateway.0b_: unknown key '0b_' (expected one of: id, state_dir, log_level, http, audit)"
    ]


def test_a_simulated_mcp_device_must_be_allowed_by_the_mcp_section() -> None:
    text = textwrap.dedent(
        """\
        mcp:
          listen: 127.0.0.1:7720
          devices: [{id: pump-1, token: token-0123456789}]
        simulator:
          mcp:
            - {id: pump-l, interval: 1s}
        """
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml")
    assert info.value.errors == [
        "c.yaml:6: simulator.mcp[0].id: 'pump-l' is not in mcp.devices (did you mean 'pump-1'?)"
    ]
    with pytest.raises(ConfigError) as info:
        parse_config("simulator:\n  mcp: [{id: x}]\n", "c.yaml")
    assert info.value.errors == ["c.yaml:2: simulator.mcp[0].id: 'x' is not in an `mcp` section"]


def test_mcp_tokens_shorter_than_16_characters_are_refused(tmp_path: Path) -> None:
    # A short token can be guessed over the network: `fieldgate check` (and `run`) say so, exit 2, never echo it.
    text = "mcp:\n  listen: 127.0.0.1:7720\n  devices:\n    - {id: a, token: abcdefghijklmno}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml")
    assert info.value.errors == ["c.yaml:4: mcp.devices[0].token: must be at least 16 characters"]
    assert parse_config(text.replace("mno}", "mnop}"), "c.yaml").config.mcp is not None
    path = tmp_path / "c.yaml"
    path.write_text(text)
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "at least 16 characters" in r.stderr and "abcdefghijklmno" not in r.stderr


def test_mcp_limits_take_units_and_have_the_documented_defaults() -> None:
    mcp = load("mcp: {}\n").config.mcp
    assert mcp is not None
    assert (mcp.hello_timeout, mcp.max_hello_payload, mcp.max_hello_errors) == (10.0, 4096, 3)
    assert (mcp.max_pending, mcp.max_pending_per_ip) == (256, 32)
    assert (mcp.auth_ban_failures, mcp.auth_ban_window, mcp.auth_ban_time) == (10, 60.0, 60.0)
    assert (mcp.max_points, mcp.max_string, mcp.max_unread, mcp.max_future_ts) == (256, 1024, 65536, 86400.0)
    text = (
        "mcp:\n  hello_timeout: 2s\n  max_hello_payload: 1KB\n  auth_ban_window: 5m\n  auth_ban_time: 1h\n"
        "  max_unread: 128KB\n  max_future_ts: 2h\n  max_string: 4KB\n"
    )
    mcp = load(text).config.mcp
    assert mcp is not None
    assert (mcp.hello_timeout, mcp.max_hello_payload, mcp.auth_ban_window, mcp.auth_ban_time) == (
        2.0,
        1024,
        300.0,
        3600.0,
    )
    assert (mcp.max_unread, mcp.max_future_ts, mcp.max_string) == (131072, 7200.0, 4096)
    assert errors_of("mcp:\n  hello_timeout: 0s\n  max_unread: 1KB\n  max_hello_errors: 0\n") == [
        "cfg.yaml:2: mcp.hello_timeout: must be more than 0.0, got '0s'",
        "cfg.yaml:3: mcp.max_unread: must be at least 4096, got '1KB'",
        "cfg.yaml:4: mcp.max_hello_errors: must be at least 1, got 0",
    ]


def test_mcp_limits_that_another_makes_meaningless_are_warned_about() -> None:
    loaded = load("mcp:\n  max_pending: 10\n  max_pending_per_ip: 20\n  max_payload: 2KB\n  max_hello_payload: 4KB\n")
    assert [w for w in loaded.warnings if "holds first" in w] == [
        "cfg.yaml:3: mcp.max_pending_per_ip: max_pending_per_ip (20) is above max_pending (10), which holds first",
        "cfg.yaml:5: mcp.max_hello_payload: max_hello_payload (4096) is above max_payload (2048), which holds first",
    ]


def test_names_refuse_a_trailing_newline() -> None:
    # A config id "pump-1\n" could never match a HELLO: names are matched whole (fullmatch), like the drivers'.
    errors = errors_of(
        """\
        gateway: {id: "plant-7\\n", state_dir: /tmp/fieldgate, http: null}
        northbound: [{name: "local\\n"}]
        mcp:
          listen: 127.0.0.1:9000
          devices: [{id: "pump-1\\n", token: s3cret-token-0001}]
        """
    )
    assert len(errors) == 3, errors
    assert all("is not a topic-safe name" in e for e in errors), errors
    assert VALUE_NAME is TOPIC_NAME  # one rule for names in the config and in MCP DATA
