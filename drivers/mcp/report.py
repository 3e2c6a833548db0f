"""What the MCP server reports of itself: a frozen snapshot of its sessions, refusals and devices' counters."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any, ClassVar, Protocol

from gateway.types import McpDeviceCounters, McpDeviceSnapshot, McpServerSnapshot, McpSessionSnapshot


class _Counters(Protocol):
    """A dataclass of session counters."""

    __dataclass_fields__: ClassVar[dict[str, Any]]


class _Session(Protocol):
    @property
    def peer(self) -> object: ...


class ReportingServer(Protocol):
    """The server's parts the snapshot copies."""

    @property
    def sessions(self) -> Mapping[str, _Session]: ...
    @property
    def pending(self) -> int: ...
    @property
    def rejected(self) -> int: ...
    @property
    def refused(self) -> Mapping[str, int]: ...
    @property
    def auth_failures(self) -> Mapping[str, int]: ...
    @property
    def totals(self) -> _Counters: ...

    def stats_for(self, device_id: str | None) -> _Counters: ...


def peer_text(peer: object) -> str:
    """A session's peer address as people read it: "host:port" (a Unix socket's path as it is)."""
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)


def server_snapshot(server: ReportingServer, device_ids: Iterable[str]) -> McpServerSnapshot:
    """The server's figures and each of `device_ids`' (the configured devices, in config order), copied."""

    def counters(device_id: str) -> McpDeviceCounters:
        return McpDeviceCounters(**asdict(server.stats_for(device_id)))

    sessions = server.sessions
    return McpServerSnapshot(
        sessions=tuple(
            McpSessionSnapshot(device_id, peer_text(session.peer), counters(device_id))
            for device_id, session in sorted(sessions.items())
        ),
        devices=tuple(McpDeviceSnapshot(d, d in sessions, counters(d)) for d in device_ids),
        pending=server.pending,
        rejected=server.rejected,
        refused=dict(server.refused),
        auth_failures=dict(server.auth_failures),
        totals=McpDeviceCounters(**asdict(server.totals)),
    )
