"""The gateway's side of the Modbus TCP server: its write gate (the MQTT writes' rate limit and audit log), its build.

A client's write spends a token of the same per-device bucket MQTT writes spend (`write_rate`,
`write_burst`), and is audited like them: a `request` line before the device is touched, its outcome after,
with `origin` `modbus-tcp <peer>` and `action` `write`, the request as the server describes it as its target.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from drivers.modbus.bus import ModbusBus
from drivers.modbus.server import ModbusTcpServer
from gateway.audit import AuditRecord
from gateway.config.schema import Config
from gateway.config.settings import modbus_server

log = logging.getLogger(__name__)

#: What `admit` needs of the gateway's set/cmd requests (gateway.device_requests.DeviceRequests).
WriteRate = Callable[[str], str | None]
Audit = Callable[[AuditRecord], None]
#: Writes admitted and waiting for their outcome, kept for its duration; the server records each outcome.
ADMITTED_MAX = 4096


class ServerWriteGate:
    """The server's WriteGate: the device's write rate shared with MQTT writes, and the audit log."""

    def __init__(self, listen: str, write_rate: Callable[[], WriteRate | None], audit: Callable[[], Audit | None]):
        self._topic = f"modbus-tcp://{listen}"  # an audit record's `topic`: the server the request came in on
        self._write_rate = write_rate
        self._audit = audit
        #: Admitted writes by (device, origin, what): when each was admitted, for its outcome's duration.
        self._admitted: dict[tuple[str, str, str], list[tuple[int, float]]] = {}

    def admit(self, device: str, origin: str, what: str) -> str | None:
        """None when `device` may be written now (a token spent, the `request` line written), else the refusal."""
        admit = self._write_rate()
        refusal = admit(device) if admit is not None else None
        if refusal is None:
            arrived = (time.time_ns(), time.monotonic())
            if len(self._admitted) >= ADMITTED_MAX:  # outcomes that never came: their durations are lost, not memory
                self._admitted.clear()
            self._admitted.setdefault((device, origin, what), []).append(arrived)
            self._write(self._record(device, origin, what, arrived[0], ok=None, stage="request"))
        return refusal

    def record(self, device: str, origin: str, what: str, ok: bool, error: str | None) -> None:
        """The outcome of a client's write: carried out (ok), failed, or refused before the device saw it."""
        waiting = self._admitted.get((device, origin, what))
        arrived_ns, started = waiting.pop(0) if waiting else (time.time_ns(), time.monotonic())
        if waiting == []:
            del self._admitted[(device, origin, what)]
        duration_ms = (time.monotonic() - started) * 1000
        self._write(self._record(device, origin, what, arrived_ns, ok=ok, error=error, duration_ms=duration_ms))

    def _record(self, device: str, origin: str, what: str, arrived_ns: int, **outcome: object) -> AuditRecord:
        return AuditRecord(
            ts_ns=arrived_ns,
            origin=origin,
            topic=self._topic,
            device=device,
            action="write",
            target=what,
            request=None,
            **outcome,  # type: ignore[arg-type]
        )

    def _write(self, record: AuditRecord) -> None:
        audit = self._audit()
        if audit is None:
            return
        try:
            audit(record)
        except Exception:
            # The write is carried out (or refused) as asked; losing its record is worth a traceback, not more.
            log.exception("audit record of a Modbus TCP write to %s could not be written", record.device)


def build_modbus_server(
    cfg: Config,
    buses: Sequence[ModbusBus],
    write_rate: Callable[[], WriteRate | None],
    audit: Callable[[], Audit | None],
) -> ModbusTcpServer | None:
    """The Modbus TCP server `modbus.server` configures over the running lines, or None when there is none."""
    section = cfg.modbus.server
    if section is None:
        return None
    settings = modbus_server(section)
    return ModbusTcpServer(settings, buses, ServerWriteGate(settings.listen, write_rate, audit))
