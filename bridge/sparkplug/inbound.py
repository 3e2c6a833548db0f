"""What a Sparkplug host sends an edge node: its STATE, and NCMD/DCMD commands, read into plain values.

Every input here comes from the network: each reader bounds what it takes and says why it refuses the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge.sparkplug.payload import CommandRefused, get_value, read_command
from bridge.sparkplug.session import REBIRTH, EdgeSession
from gateway.jsonsafe import JsonRejected, loads_strict
from gateway.types import Value

#: A STATE payload longer than this is not one (`{"online": true, "timestamp": 1700000000000}` is 44 bytes).
MAX_STATE_BYTES = 1024


@dataclass(frozen=True, slots=True)
class HostState:
    """A primary host's STATE: online or not, and when it said so (unix ms; 0 when the payload has no time)."""

    online: bool
    timestamp: int


def read_state(data: bytes) -> HostState:
    """A STATE payload: Sparkplug 3.0's JSON, or 2.2's bare ONLINE/OFFLINE; ValueError saying why it is neither."""
    if len(data) > MAX_STATE_BYTES:
        raise ValueError(f"{len(data)} bytes; a STATE has a few dozen")
    text = data.strip()
    if text in (b"ONLINE", b"OFFLINE"):
        return HostState(text == b"ONLINE", 0)
    try:
        body = loads_strict(data)
    except JsonRejected as exc:
        raise ValueError(f"not JSON: {str(exc)[:80]}") from None
    online = body.get("online") if isinstance(body, dict) else None
    ts = body.get("timestamp", 0) if isinstance(body, dict) else None
    if not isinstance(online, bool):
        raise ValueError('not {"online": true|false, "timestamp": ms}')
    if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts < 2**63:
        raise ValueError(f"timestamp {str(ts)[:40]} is not unix milliseconds")
    return HostState(online, ts)


def rebirth_requested(session: EdgeSession, data: bytes) -> bool:
    """Whether an NCMD asks for a rebirth (`Node Control/Rebirth` = true); CommandRefused if it is no payload."""
    payload = read_command(data)
    return any(
        m.name == REBIRTH and m.WhichOneof("value") == "boolean_value" and m.boolean_value for m in payload.metrics
    )


def device_writes(session: EdgeSession, device: str, data: bytes) -> list[tuple[str, Value]]:
    """The (metric name, value) writes of a DCMD to `device`, in the order given; CommandRefused if it is none.

    A metric named neither by a name nor by an alias its birth gave keeps the alias as `alias <n>`: the write is
    refused (and audited) as one to an unknown point.
    """
    if not device:  # `DCMD/+` matches an empty level too; the session's "" is the node, no device
        raise CommandRefused("a DCMD without a device")
    payload = read_command(data)
    writes: list[tuple[str, Value]] = []
    born = session.devices.get(device)
    for m in payload.metrics:
        name: str | None = m.name if m.HasField("name") and m.name else None
        if name is not None and not isinstance(name, str):  # protobuf hands a proto2 string not in UTF-8 as bytes
            raise CommandRefused("a metric name that is not UTF-8")
        if name is None and m.HasField("alias"):
            name = session.name_of(device, m.alias)
        if name is None:
            name = f"alias {m.alias}" if m.HasField("alias") else "(no name)"
        datatype = born.metrics[name][1] if born is not None and name in born.metrics else None
        writes.append((name, get_value(m, datatype)))
    if not writes:
        raise CommandRefused("a DCMD without metrics")
    return writes
