"""What the MCP/1 server needs to run, as frozen values (built once from the validated config by the gateway).

Durations are seconds, sizes are bytes. Attribute names are the config keys of the `mcp` section, so a
reader finds each one documented there; only `listen` comes parsed as well (`host`, `port`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """The server's certificate and key files, and the CA that signs device certificates (None: not asked for)."""

    cert: str
    key: str
    client_ca: str | None = None


@dataclass(frozen=True, slots=True)
class McpDeviceSettings:
    """An MCP device allowed to connect, and the rate of commands it is given."""

    id: str
    token: str = field(repr=False)  # a secret: kept out of reprs and logs
    write_rate: float = 5.0  # commands/s on average
    write_burst: int = 10  # commands at once after a quiet spell


@dataclass(frozen=True, slots=True)
class McpSettings:
    """The MCP/1 server: where it listens, its limits, its login bans and the devices it admits."""

    listen: str  # as configured (`HOST:PORT`, `[v6]:PORT`): for messages
    host: str
    port: int
    tls: TlsSettings | None = None
    heartbeat_s: int = 30
    ack_timeout: float = 5.0
    retries: int = 3
    max_payload: int = 1024 * 1024
    max_sessions: int = 10000
    hello_timeout: float = 10.0
    max_hello_payload: int = 4096
    max_hello_errors: int = 3
    max_pending: int = 256
    max_pending_per_ip: int = 32
    auth_ban_failures: int = 10
    auth_ban_window: float = 60.0
    auth_ban_time: float = 60.0
    max_points: int = 256
    max_string: int = 1024
    max_unread: int = 64 * 1024
    max_future_ts: float = 86400.0
    devices: tuple[McpDeviceSettings, ...] = ()
