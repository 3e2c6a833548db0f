"""The converter from the validated config to the drivers' settings: every key lands, addresses come parsed."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from drivers.mcp.server import McpServer
from drivers.mcp.settings import McpDeviceSettings, McpSettings, TlsSettings
from drivers.modbus.codec import PointCodec
from drivers.modbus.settings import DeviceSettings, LineSettings, PointSettings, TcpEndpoint
from gateway.config.addresses import modbus_port, port_key, resolve_path, split_listen
from gateway.config.schema import BusConfig, McpSection, ModbusServerConfig, PointConfig
from gateway.config.settings import mcp_server, modbus_line, modbus_plan, modbus_server, point_codec

# Every key away from its default, so that a key the converter forgets shows as the settings' default.
POINT = {
    "name": "flow",
    "table": "holding",
    "address": 7,
    "type": "int32",
    "byte_order": "little",
    "word_order": "little",
    "scale": 0.5,
    "offset": -3.0,
    "deadband": 0.25,
    "poll": "200ms",
    "writable": True,
    "min": -10,
    "max": 90,
}
DEVICE = {
    "name": "meter",
    "unit": 9,
    "poll": "2s",
    "full_every": "5m",
    "max_gap": 3,
    "max_registers": 60,
    "timeout": "150ms",
    "retries": 4,
    "offline_after": 7,
    "write_rate": 1.5,
    "write_burst": 3,
    "points": [POINT],
}
BUS = {
    "name": "rs485",
    "port": "/dev/ttyUSB3",
    "baudrate": 19200,
    "parity": "O",
    "bytesize": 7,
    "stopbits": 2,
    "timeout": "250ms",
    "retries": 3,
    "inter_request_delay": "4ms",
    "offline_after": 5,
    "connect_timeout": "7s",
    "rs485": {
        "rts_on_send": False,
        "rts_after_send": True,
        "delay_before_tx": "1ms",
        "delay_after_tx": "2ms",
        "rx_during_tx": True,
    },
    "devices": [DEVICE],
}
SERVER = {
    "listen": "10.0.0.2:1502",
    "max_connections": 3,
    "max_queue": 2,
    "idle_timeout": "30s",
    "cache_max_age": "500ms",
    "expose": [{"unit": 4, "device": "meter", "writes": True, "passthrough": "all"}],
}
MCP = {
    "listen": "[::1]:7721",
    "tls": {"cert": "/etc/fg/cert.pem", "key": "/etc/fg/key.pem", "client_ca": "/etc/fg/ca.pem"},
    "heartbeat_s": 45,
    "ack_timeout": "3s",
    "retries": 5,
    "max_payload": "512KiB",
    "max_sessions": 70,
    "hello_timeout": "4s",
    "max_hello_payload": 2048,
    "max_hello_errors": 6,
    "max_pending": 40,
    "max_pending_per_ip": 8,
    "auth_ban_failures": 4,
    "auth_ban_window": "2m",
    "auth_ban_time": "5m",
    "max_points": 99,
    "max_string": 300,
    "max_unread": "32KiB",
    "max_future_ts": "1h",
    "devices": [{"id": "pump-1", "token": "s3cret-token-0001", "write_rate": 0.5, "write_burst": 2}],
}


def landed(settings: Any, model: Any, parsed: set[str]) -> None:
    """Each settings field but the parsed ones holds the model's value, and that value is not the field's default."""
    for f in dataclasses.fields(settings):
        if f.name in parsed:
            continue
        value = getattr(settings, f.name)
        assert value == getattr(model, f.name), f.name
        assert value != f.default, f"{f.name}: the test's config must set it away from its default"


def test_every_key_of_a_line_its_devices_and_points_lands_in_the_settings() -> None:
    bus = BusConfig.model_validate(BUS)
    line = modbus_line(bus)
    landed(line, bus, {"port", "devices", "framing", "rs485"})
    assert line.framing == "rtu"  # a serial port speaks RTU
    assert bus.rs485 is not None and line.rs485 is not None
    landed(line.rs485, bus.rs485, set())
    (device,) = line.devices
    landed(device, bus.devices[0], {"points"})
    (point,) = device.points
    landed(point, bus.devices[0].points[0], {"codec"})
    assert point.codec == PointCodec.parse("int32", byte_order="little", word_order="little", scale=0.5, offset=-3.0)
    assert line.port == "/dev/ttyUSB3"
    assert isinstance(line, LineSettings) and isinstance(device, DeviceSettings) and isinstance(point, PointSettings)


@pytest.mark.parametrize(("framing", "expected"), [(None, "tcp"), ("tcp", "tcp"), ("rtu", "rtu")])
def test_a_tcp_port_speaks_modbus_tcp_unless_told_rtu(framing: str | None, expected: str) -> None:
    bus = {"name": "plc", "port": "tcp://10.0.0.7:502"} | ({"framing": framing} if framing else {})
    line = modbus_line(BusConfig.model_validate(bus))
    assert (line.framing, line.mbap, line.is_tcp) == (expected, expected == "tcp", True)


@pytest.mark.parametrize(
    ("bus", "error"),
    [
        ({"port": "/dev/ttyUSB0", "framing": "tcp"}, "framing: tcp .* needs a tcp://HOST:PORT port"),
        ({"port": "tcp://10.0.0.7:502", "rs485": {}}, "`rs485` is for a serial port"),
        ({"port": "/dev/ttyUSB0", "devices": [{"name": "d", "unit": 0}]}, "unit 0 is not a unit on an RTU line"),
        (
            {"port": "tcp://10.0.0.7:4001", "framing": "rtu", "devices": [{"name": "d", "unit": 255}]},
            "unit 255 is not a unit on an RTU line",
        ),
    ],
)
def test_a_framing_or_rs485_that_does_not_fit_the_port_is_refused(bus: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        BusConfig.model_validate({"name": "l", **bus})


def test_every_key_of_the_modbus_server_lands_in_the_settings() -> None:
    section = ModbusServerConfig.model_validate(SERVER)
    settings = modbus_server(section)
    landed(settings, section, {"host", "port", "expose"})
    assert (settings.host, settings.port) == ("10.0.0.2", 1502)
    (expose,) = settings.expose
    landed(expose, section.expose[0], set())


def test_every_key_of_the_mcp_section_lands_in_the_settings() -> None:
    section = McpSection.model_validate(MCP)
    settings = mcp_server(section)
    landed(settings, section, {"host", "port", "tls", "devices"})
    assert (settings.listen, settings.host, settings.port) == ("[::1]:7721", "::1", 7721)
    assert settings.tls == TlsSettings("/etc/fg/cert.pem", "/etc/fg/key.pem", "/etc/fg/ca.pem")
    assert settings.devices == (McpDeviceSettings("pump-1", "s3cret-token-0001", write_rate=0.5, write_burst=2),)
    assert "s3cret" not in repr(settings)  # a token stays out of reprs and the logs that print them
    assert isinstance(settings, McpSettings)


async def test_the_mcp_servers_profiles_come_from_its_settings() -> None:
    server = McpServer(mcp_server(McpSection.model_validate(MCP)), lambda s: None, lambda s: None)  # type: ignore[arg-type,return-value]
    (profile,) = server.profiles()
    assert (profile.name, profile.write_rate, profile.write_burst) == ("pump-1", 0.5, 2)
    assert profile.every_sample and profile.commander == server.command and profile.writer is None
    assert profile.points is None  # an MCP device pushes what it has


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        ("tcp://10.0.0.7:4001", TcpEndpoint("10.0.0.7", 4001)),
        ("tcp://plc-gw.local:502", TcpEndpoint("plc-gw.local", 502)),
        ("tcp://[fd00::7]:502", TcpEndpoint("fd00::7", 502)),  # without brackets, as sockets take an address
        ("/dev/ttyUSB0", "/dev/ttyUSB0"),
        ("./var/ttySIM0", "./var/ttySIM0"),
    ],
)
def test_a_modbus_port_is_a_serial_path_or_a_tcp_endpoint(port: str, expected: str | TcpEndpoint) -> None:
    parsed = modbus_port(port)
    assert parsed == expected
    assert str(parsed) == port  # messages name the port as it was configured


def test_a_relative_serial_path_is_taken_from_the_config_files_folder(tmp_path: Path) -> None:
    def port_of(port: str) -> str | TcpEndpoint:
        return modbus_line(BusConfig.model_validate({**BUS, "port": port, "rs485": None}), tmp_path).port

    assert port_of("./var/ttySIM0") == str(tmp_path / "var" / "ttySIM0")
    assert port_of("/dev/ttyUSB0") == "/dev/ttyUSB0"
    assert port_of("tcp://10.0.0.7:4001") == TcpEndpoint("10.0.0.7", 4001)
    assert resolve_path("var/../tty1", tmp_path) == str(
        tmp_path / "tty1"
    )  # normalised, not resolved: no links followed


@pytest.mark.parametrize(
    ("listen", "every_interface", "expected"),
    [
        ("127.0.0.1:9720", None, ("127.0.0.1", 9720)),
        (":9720", None, (None, 9720)),  # the status page: aiohttp takes None for every interface
        ("[::]:9720", None, ("::", 9720)),
        (":7720", "0.0.0.0", ("0.0.0.0", 7720)),  # the MCP server: asyncio takes 0.0.0.0
        ("[::1]:7720", "0.0.0.0", ("::1", 7720)),
        ("10.1.2.3:7720", "0.0.0.0", ("10.1.2.3", 7720)),
    ],
)
def test_split_listen_keeps_each_callers_every_interface(
    listen: str, every_interface: str | None, expected: tuple[str | None, int]
) -> None:
    assert split_listen(listen, every_interface) == expected


def test_an_mcp_listen_without_a_host_is_every_ipv4_interface() -> None:
    settings = mcp_server(McpSection.model_validate({"listen": ":7720"}))
    assert (settings.host, settings.port) == ("0.0.0.0", 7720)


def test_the_schema_keeps_no_codec_and_points_of_one_layout_share_theirs() -> None:
    a, b = (PointConfig.model_validate({**POINT, "name": name}) for name in ("a", "b"))
    assert not hasattr(a, "codec") and not a.__pydantic_private__
    assert point_codec(a) is point_codec(b)
    bits = PointConfig.model_validate(
        {"name": "s", "table": "input", "address": 0, "type": "bitfield", "bits": [None, "run", "fault"]}
    )
    assert point_codec(bits).bits == ((1, "run"), (2, "fault"))
    assert point_codec(PointConfig.model_validate({"name": "c", "table": "coil", "address": 0})).type == "bool"


def test_a_bad_codec_spec_is_still_refused_with_the_codecs_words() -> None:
    with pytest.raises(ValueError, match=r"type 'string' needs a length: string:N"):
        PointConfig.model_validate({"name": "s", "table": "holding", "address": 0, "type": "string"})
    with pytest.raises(ValueError, match=r"scale/offset do not apply to bool points"):
        PointConfig.model_validate({"name": "b", "table": "holding", "address": 0, "type": "bool", "scale": 2})


def test_a_plan_takes_the_port_as_written_and_only_the_line_parses_it() -> None:
    # `fieldgate check` plans every line for its budget warnings: a port it does not check must not fail it.
    bus = BusConfig.model_validate({**BUS, "port": "tcp://plc", "rs485": None})
    assert modbus_plan(bus).port == "tcp://plc"
    assert modbus_plan(bus).devices == modbus_line(BusConfig.model_validate(BUS)).devices
    with pytest.raises(ValueError, match="invalid literal"):
        modbus_line(bus)


def test_ports_name_one_line_or_endpoint_however_they_are_spelled() -> None:
    assert port_key("./var/tty0") == port_key("var/tty0")
    assert port_key("tcp://PLC-1.local:502") == port_key("tcp://plc-1.local:502")
    assert port_key("tcp://[fd00::7]:502") == port_key("tcp://FD00::7:502")
    assert port_key("tcp://plc:502") != port_key("tcp://plc:503")
