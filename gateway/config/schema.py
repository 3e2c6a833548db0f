"""The typed configuration schema (contract: shared/spec/INTERFACE.md section 2)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from .fields import HaDeviceClass, HaIcon, HaStateClass, Listener, Name, TopicFilter, TopicPrefix

# The Modbus sections live in schema_modbus.py; they are re-exported so that the schema reads as one module.
from .schema_modbus import BusConfig as BusConfig
from .schema_modbus import DeviceConfig as DeviceConfig
from .schema_modbus import ExposeConfig as ExposeConfig
from .schema_modbus import ModbusConfig as ModbusConfig
from .schema_modbus import ModbusServerConfig as ModbusServerConfig
from .schema_modbus import Model as Model
from .schema_modbus import PointConfig as PointConfig
from .schema_modbus import Rs485Config as Rs485Config
from .schema_modbus import Table as Table
from .units import Duration, Size

# --- gateway, broker, northbound --------------------------------------------------------------


def _default_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).strip(".-") or "fieldgate"
    return host[:64]


def _default_state_dir() -> str:
    # systemd sets STATE_DIRECTORY for units with StateDirectory=; INVOCATION_ID for any unit.
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    return "/var/lib/fieldgate" if os.environ.get("INVOCATION_ID") else "./var"


class AuditConfig(Model):
    """The audit log of writes and commands (`<state_dir>/audit.log`), rotated by size."""

    max_size: Size = Field(default=1024**2, ge=1024)
    backups: int = Field(default=5, ge=1, le=100)


class GatewaySection(Model):
    """Identity and process-wide settings."""

    id: Name = Field(default_factory=_default_id)
    state_dir: str = Field(default_factory=_default_state_dir)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    http: str | None = "127.0.0.1:9720"
    audit: AuditConfig = Field(default_factory=AuditConfig)


class BrokerAccess(Model):
    """What one user of the embedded broker may do: topic filters to read (subscribe) and write (publish)."""

    read: list[TopicFilter] = Field(default_factory=list)
    write: list[TopicFilter] = Field(default_factory=list)


class BrokerSection(Model):
    """The embedded MQTT broker."""

    enabled: bool = True
    process: Literal["inline", "separate"] = "separate"  # its own process, a core of its own; inline: on our loop
    listeners: list[Listener] = Field(default_factory=lambda: ["tcp://127.0.0.1:1883"], min_length=1)
    users: str | None = None  # file of `user:argon2-hash` lines (`fieldgate passwd`); none: anonymous access
    acl: dict[str, BrokerAccess] | None = None  # user -> access; none: read all, write set/cmd
    cert: str | None = None
    key: str | None = None

    @model_validator(mode="after")
    def _tls_needs_cert(self) -> BrokerSection:
        if any(u.startswith(("mqtts", "wss")) for u in self.listeners) and not (self.cert and self.key):
            raise ValueError("mqtts:// and wss:// listeners need `cert` and `key`")
        if self.acl is not None and self.users is None:
            raise ValueError("`acl` rules users of the `users` file: without one, access is anonymous and open")
        return self


class SpoolConfig(Model):
    """Store-and-forward limits of one sink, and how its backlog is replayed."""

    max_size: Size = 256 * 1024**2
    max_age: Duration = 30 * 86400.0
    when_full: Literal["drop_oldest", "reject"] = "drop_oldest"
    min_free: Size = 64 * 1024**2  # free-disk floor on the state dir's filesystem
    replay_rate: float = Field(default=500.0, gt=0)  # messages/s while a backlog drains
    # After a (re)connect the replay starts after a random delay in [0, this]; None: REPLAY_DELAY for a sink with
    # a url (a fleet's gateways share that broker), none for the embedded broker (only this gateway uses it).
    replay_delay: Duration | None = None
    order: Literal["live", "strict"] = "live"  # strict: live data waits behind the backlog
    commit_window: Duration = 0.12  # group commit: messages spooled within this window share one fsync


class SparkplugConfig(Model):
    """How a `format: sparkplug` sink names the gateway in the Sparkplug B namespace (spBv1.0/<group>/.../<edge>)."""

    group_id: Name
    edge_node_id: Name | None = None  # None: gateway.id
    # A Sparkplug 3.0 primary host application: births wait for its STATE online; meanwhile the data is spooled.
    primary_host: Name | None = None


def _protocol(value: object) -> object:
    """`protocol: 5` (a YAML number) or "5"; "3.1.1" as it is."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class SinkConfig(Model):
    """A northbound MQTT broker the gateway publishes to."""

    name: Name
    url: str | None = None  # None: the embedded broker (with `urls`: set to its first)
    urls: list[str] | None = None  # the nodes of one cluster, taken in turn (instead of `url`)
    reconnect_base: Duration = Field(default=1.0, gt=0)  # full-jitter back-off: wait n in [0, min(cap, base*2^n)]
    reconnect_cap: Duration = Field(default=60.0, gt=0)
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    qos: Literal[0, 1] = 1
    keepalive: Duration = 30.0
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    topic_prefix: TopicPrefix | None = None  # None: fieldgate/<gateway.id>
    format: Literal["json", "sparkplug"] = "json"  # json: the topic contract of INTERFACE.md; sparkplug: Sparkplug B
    sparkplug: SparkplugConfig | None = None
    protocol: Annotated[Literal["3.1.1", "5"], BeforeValidator(_protocol)] = "3.1.1"
    # MQTT 5: how long the broker keeps the session (the set/cmd subscriptions, requests queued meanwhile); None:
    # max_request_age (a request queued longer would be refused as too old anyway).
    session_expiry: Duration | None = Field(default=None, le=0xFFFFFFFF)
    # A set/cmd older than this (by its MQTT 5 message expiry, else by this) is refused, never carried out late.
    max_request_age: Duration = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _protocol_fits(self) -> SinkConfig:
        if self.protocol != "5":
            if self.session_expiry is not None:
                raise ValueError("`session_expiry` is an MQTT 5 session's: it goes with `protocol: 5`")
            return self
        if self.url is None and self.urls is None:
            raise ValueError("protocol: 5 needs a broker with a url: the embedded broker speaks MQTT 3.1.1")
        if self.format == "sparkplug":
            raise ValueError("a sparkplug sink speaks MQTT 3.1.1 (protocol: 5 is for format: json)")
        return self

    @model_validator(mode="after")
    def _sparkplug(self) -> SinkConfig:
        if self.format != "sparkplug":
            if self.sparkplug is not None:
                raise ValueError("`sparkplug` goes with `format: sparkplug`")
            return self
        if self.sparkplug is None:
            raise ValueError("format: sparkplug needs a `sparkplug` section with at least `group_id`")
        # What the specification fixes is not the user's to set: a value given anyway would be silently ignored.
        fixed = {
            "topic_prefix": "the namespace is spBv1.0/<group_id>/...",
            "qos": "each message type has the QoS the specification gives it",
        }
        for key, why in fixed.items():
            if key in self.model_fields_set:
                raise ValueError(f"`{key}` does not apply to a sparkplug sink: {why}")
        if "order" in self.spool.model_fields_set and self.spool.order != "strict":
            raise ValueError(
                "a sparkplug sink replays in order (spool.order: strict): births, then the stored data, then live data"
            )
        self.spool.order = "strict"
        return self

    @model_validator(mode="after")
    def _url_scheme(self) -> SinkConfig:
        if self.url is not None and self.urls is not None:
            raise ValueError("give either `url` (one broker) or `urls` (the nodes of one cluster), not both")
        if self.urls is not None and not self.urls:
            raise ValueError("urls: give at least one url (or leave `urls` out for the embedded broker)")
        named = (
            [("url", self.url)] if self.url is not None else [(f"urls[{i}]", u) for i, u in enumerate(self.urls or [])]
        )
        for key, url in named:
            if "@" in url:
                # Not echoed: what precedes the `@` is most likely a password.
                raise ValueError(f"{key} must not carry credentials: give them as `username` and `password`")
            if not re.match(r"^mqtts?://[^:/]+(:\d{1,5})?/?$", url):
                raise ValueError(f"{key} {url!r}: use mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        if self.urls is not None and len(set(self.urls)) < len(self.urls):
            raise ValueError("urls: each node once (a node named twice would take two turns)")
        if self.reconnect_cap < self.reconnect_base:
            raise ValueError(
                f"reconnect_cap ({self.reconnect_cap:g} s) is below reconnect_base ({self.reconnect_base:g} s)"
            )
        if self.urls is not None:
            # Everything that asks `url is None` (the embedded broker?) sees a broker of its own: the first node.
            self.url = self.urls[0]
        return self


# --- mcp, homeassistant -----------------------------------------------------------------------


class TlsConfig(Model):
    """Server certificate and optional client CA."""

    cert: str
    key: str
    client_ca: str | None = None


class McpPointConfig(Model):
    """A value an MCP device pushes, declared so that Home Assistant discovery can describe it."""

    name: Name
    type: Literal["number", "bool", "string"] = "number"
    unit: str | None = None
    device_class: HaDeviceClass | None = None
    state_class: HaStateClass | None = None
    icon: HaIcon | None = None

    @model_validator(mode="after")
    def _numeric_hints(self) -> McpPointConfig:
        if self.type != "number" and (self.unit is not None or self.state_class is not None):
            raise ValueError(f"`unit` and `state_class` are for number points, not {self.type} ones")
        return self


class McpDeviceConfig(Model):
    """An MCP device allowed to connect."""

    id: Name
    # A short token can be guessed over the network; 16 characters is the least `fieldgate check` takes.
    token: str = Field(min_length=16)
    meta: dict[str, Any] = Field(default_factory=dict)
    write_rate: float = Field(default=5.0, gt=0)  # commands/s the device is given, on average
    write_burst: int = Field(default=10, ge=1)  # commands allowed at once after a quiet spell
    # MCP devices declare nothing up front: only the points listed here get discovery configs.
    points: list[McpPointConfig] = Field(default_factory=list)


class McpSection(Model):
    """The MCP/1 TCP server."""

    listen: str = "0.0.0.0:7720"
    tls: TlsConfig | None = None
    heartbeat_s: int = Field(default=30, ge=1, le=3600)
    ack_timeout: Duration = 5.0
    retries: int = Field(default=3, ge=0, le=20)
    max_payload: Size = 1024 * 1024
    max_sessions: int = Field(default=10000, ge=1)  # sessions past HELLO
    # Before HELLO nobody is trusted: a connection has `hello_timeout` from accept (TLS handshake
    # included) to log in, small frames only, a few mistakes, and its own caps apart from max_sessions.
    hello_timeout: Duration = Field(default=10.0, gt=0, le=3600)
    max_hello_payload: Size = Field(default=4096, ge=256)
    max_hello_errors: int = Field(default=3, ge=1, le=1000)
    max_pending: int = Field(default=256, ge=1)
    max_pending_per_ip: int = Field(default=32, ge=1)
    # Failed logins from one address (an IPv6 /64) within the window close its connections at accept.
    auth_ban_failures: int = Field(default=10, ge=1)
    auth_ban_window: Duration = Field(default=60.0, gt=0)
    auth_ban_time: Duration = 60.0
    # What one device may put into the gateway.
    max_points: int = Field(default=256, ge=1, le=100_000)
    max_string: Size = Field(default=1024, ge=1)
    max_unread: Size = Field(default=64 * 1024, ge=4096)
    max_future_ts: Duration = 86400.0
    devices: list[McpDeviceConfig] = Field(default_factory=list)


class HomeAssistantSection(Model):
    """Home Assistant MQTT discovery."""

    enabled: bool = False
    discovery_prefix: TopicPrefix = "homeassistant"


# --- simulator --------------------------------------------------------------------------------


class SimValue(Model):
    """How a simulated point's value moves over time (engineering units)."""

    wave: Literal["constant", "sine", "ramp", "toggle", "bits", "random"] = "constant"
    value: float | bool | str = 0
    min: float = 0.0
    max: float = 100.0
    period: Duration = 60.0
    step: float = 1.0


class SimModbusDevice(Model):
    """A virtual Modbus slave on a simulated line or endpoint."""

    unit: int = Field(ge=0, le=255)  # as a polled device's: 1-247 on an RTU line, 0-255 on Modbus TCP
    dead: bool = False  # never answers: shows offline handling
    values: dict[str, SimValue] = Field(default_factory=dict)


class SimModbusLine(Model):
    """A virtual serial line: a pty pair whose gateway end is linked at `link`."""

    link: str = Field(min_length=1)
    devices: list[SimModbusDevice] = Field(default_factory=list)


class SimModbusTcp(Model):
    """A virtual Modbus TCP endpoint on `listen`, many units behind it; it speaks the framing of the bus polling it."""

    listen: str = Field(min_length=1)  # HOST:PORT; the bus with port tcp://HOST:PORT polls it
    devices: list[SimModbusDevice] = Field(default_factory=list)


class SimMcpDevice(Model):
    """A virtual MCP device that connects to the gateway's MCP server and pushes DATA."""

    id: Name  # must be one of mcp.devices; its token is taken from there
    interval: Duration = 5.0
    values: dict[Name, SimValue] = Field(default_factory=dict)


class SimulatorSection(Model):
    """Virtual field devices started in-process (demos and tests)."""

    modbus: list[SimModbusLine] = Field(default_factory=list)
    modbus_tcp: list[SimModbusTcp] = Field(default_factory=list)
    mcp: list[SimMcpDevice] = Field(default_factory=list)


# --- root --------------------------------------------------------------------------------------


class Config(Model):
    """The whole gateway configuration."""

    gateway: GatewaySection = Field(default_factory=GatewaySection)
    broker: BrokerSection = Field(default_factory=BrokerSection)
    northbound: list[SinkConfig] = Field(default_factory=lambda: [SinkConfig(name="local")], min_length=1)
    modbus: ModbusConfig = Field(default_factory=ModbusConfig)
    mcp: McpSection | None = None
    homeassistant: HomeAssistantSection = Field(default_factory=HomeAssistantSection)
    simulator: SimulatorSection | None = None

    def prefix_for(self, sink: SinkConfig) -> str:
        """The topic prefix a sink publishes under."""
        return sink.topic_prefix or f"fieldgate/{self.gateway.id}"

    def embedded_requests(self) -> list[str]:
        """What users of the embedded broker may publish without an ACL beyond the JSON sinks' set/cmd: each
        Sparkplug sink's NCMD and DCMD topics and its primary host's STATE (a host must be able to birth it)."""
        topics: list[str] = []
        for s in self.northbound:
            if s.url is None and s.sparkplug is not None:
                base, edge = f"spBv1.0/{s.sparkplug.group_id}", s.sparkplug.edge_node_id or self.gateway.id
                host = s.sparkplug.primary_host
                topics += [*([f"spBv1.0/STATE/{host}"] if host else []), f"{base}/NCMD/{edge}", f"{base}/DCMD/{edge}/+"]
        return topics

    def spool_path(self, sink: SinkConfig) -> Path:
        """The SQLite spool file of a sink, under the state dir."""
        return Path(self.gateway.state_dir) / "spool" / f"{sink.name}.sqlite"
