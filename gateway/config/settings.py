"""The drivers' settings, built once from the validated config: nothing below the gateway reads the config.

Like Home Assistant's Modbus hub turning its config into pymodbus's parameters once, each driver gets
frozen values of its own (`drivers/*/settings.py`) with addresses parsed and codecs built.
"""

from __future__ import annotations

from pathlib import Path

from drivers.mcp.settings import McpDeviceSettings, McpSettings, TlsSettings
from drivers.modbus.codec import PointCodec
from drivers.modbus.settings import (
    DeviceSettings,
    ExposeSettings,
    LineSettings,
    PointSettings,
    Rs485Settings,
    ServerSettings,
    TcpEndpoint,
)

from . import codecs
from .addresses import modbus_port, resolve_path, split_listen
from .schema import BusConfig, DeviceConfig, McpSection, ModbusServerConfig, PointConfig


def point_codec(point: PointConfig) -> PointCodec:
    """The register codec of a validated point (shared by every point of the same layout)."""
    return codecs.layout_codec(
        codecs.point_type(point.table, point.type),
        point.byte_order,
        point.word_order,
        point.scale,
        point.offset,
        codecs.named_bits(point.bits),
    )


def modbus_point(point: PointConfig) -> PointSettings:
    """What the line needs of one point."""
    return PointSettings(
        name=point.name,
        table=point.table,
        address=point.address,
        codec=point_codec(point),
        deadband=point.deadband,
        poll=point.poll,
        writable=point.writable,
        min=point.min,
        max=point.max,
    )


def modbus_device(device: DeviceConfig) -> DeviceSettings:
    """What the line needs of one device (its template already resolved into its points)."""
    return DeviceSettings(
        name=device.name,
        unit=device.unit,
        poll=device.poll,
        full_every=device.full_every,
        max_gap=device.max_gap,
        max_registers=device.max_registers,
        timeout=device.timeout,
        retries=device.retries,
        offline_after=device.offline_after,
        write_rate=device.write_rate,
        write_burst=device.write_burst,
        points=tuple(modbus_point(p) for p in device.points),
    )


def modbus_line(bus: BusConfig, base: Path | None = None) -> LineSettings:
    """A line's settings; with `base` (the config file's folder), a relative serial path is taken from there."""
    return _line(bus, modbus_port(bus.port if base is None else resolve_path(bus.port, base)))


def modbus_plan(bus: BusConfig) -> LineSettings:
    """A line's settings for planning its polls (`line_budget`), its port left as written.

    A plan needs no port, and a `tcp://` port without a number fails the line when it is built, as it always
    has, not `fieldgate check`'s budget warnings.
    """
    return _line(bus, bus.port)


def _line(bus: BusConfig, port: str | TcpEndpoint) -> LineSettings:
    rs485 = bus.rs485
    return LineSettings(
        name=bus.name,
        port=port,
        framing=bus.line_framing,
        connect_timeout=bus.connect_timeout,
        rs485=(
            Rs485Settings(
                rts_on_send=rs485.rts_on_send,
                rts_after_send=rs485.rts_after_send,
                delay_before_tx=rs485.delay_before_tx,
                delay_after_tx=rs485.delay_after_tx,
                rx_during_tx=rs485.rx_during_tx,
            )
            if rs485
            else None
        ),
        baudrate=bus.baudrate,
        parity=bus.parity,
        bytesize=bus.bytesize,
        stopbits=bus.stopbits,
        timeout=bus.timeout,
        retries=bus.retries,
        inter_request_delay=bus.inter_request_delay,
        offline_after=bus.offline_after,
        devices=tuple(modbus_device(d) for d in bus.devices),
    )


def modbus_server(section: ModbusServerConfig) -> ServerSettings:
    """The Modbus TCP server's settings; its `listen` on an empty host is every IPv4 interface."""
    host, port = split_listen(section.listen, "0.0.0.0")
    return ServerSettings(
        listen=section.listen,
        host=host,
        port=port,
        max_connections=section.max_connections,
        max_queue=section.max_queue,
        idle_timeout=section.idle_timeout,
        cache_max_age=section.cache_max_age,
        expose=tuple(ExposeSettings(e.unit, e.device, e.writes, e.passthrough) for e in section.expose),
    )


def mcp_server(section: McpSection) -> McpSettings:
    """The MCP server's settings; its `listen` on an empty host is every IPv4 interface."""
    host, port = split_listen(section.listen, "0.0.0.0")
    tls = section.tls
    return McpSettings(
        listen=section.listen,
        host=host,
        port=port,
        tls=TlsSettings(tls.cert, tls.key, tls.client_ca) if tls else None,
        heartbeat_s=section.heartbeat_s,
        ack_timeout=section.ack_timeout,
        retries=section.retries,
        max_payload=section.max_payload,
        max_sessions=section.max_sessions,
        hello_timeout=section.hello_timeout,
        max_hello_payload=section.max_hello_payload,
        max_hello_errors=section.max_hello_errors,
        max_pending=section.max_pending,
        max_pending_per_ip=section.max_pending_per_ip,
        auth_ban_failures=section.auth_ban_failures,
        auth_ban_window=section.auth_ban_window,
        auth_ban_time=section.auth_ban_time,
        max_points=section.max_points,
        max_string=section.max_string,
        max_unread=section.max_unread,
        max_future_ts=section.max_future_ts,
        devices=tuple(
            McpDeviceSettings(d.id, d.token, write_rate=d.write_rate, write_burst=d.write_burst)
            for d in section.devices
        ),
    )
