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


# Every error at once, YAML-level errors, the cross-checks and their warnings: `fieldgate check`'s exact output
# for each is a folder of tests/config_cases (run by test_config_cases.py).


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


# --- the README's config reference ----------------------------------------------------------------------


def _reference_rows() -> set[str]:
    """The keys the README's "Config reference: Modbus lines and the Modbus TCP server" tables name."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Config reference: Modbus lines and the Modbus TCP server", 1)[1].split("\n## ", 1)[0]
    keys: set[str] = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            first_cell = row.split("|")[1]
            keys |= set(first_cell.split("`")[1::2])
    return keys


def test_every_key_of_a_bus_and_of_the_modbus_tcp_server_is_in_the_readmes_config_reference() -> None:
    from gateway.config.schema import ExposeConfig, ModbusServerConfig, Rs485Config

    documented = _reference_rows()
    expected = set(BusConfig.model_fields) | {f"rs485.{k}" for k in Rs485Config.model_fields}
    expected |= {k for k in ModbusServerConfig.model_fields if k != "expose"}
    expected |= {f"expose[].{k}" for k in ExposeConfig.model_fields}
    assert expected - documented == set(), "keys the README's config reference does not name"
