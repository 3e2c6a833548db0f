"""One edge node's Sparkplug session state, and the payloads it makes: seq, aliases, what each device was born with.

Pure (no I/O, no clock of its own): the node (`node.py`) decides when a message goes out and hands its bytes to
MQTT in the order they were made here, so that `seq` on the wire runs as it runs here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from bridge.sparkplug.payload import (
    BOOLEAN,
    INT64,
    MetricSpec,
    Payload,
    birth_metric,
    data_metric,
    datatype_of,
    fits,
    set_value,
)
from gateway.types import Value

#: The node metrics every NBIRTH carries first (Sparkplug's own).
BDSEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"


@dataclass
class Born:
    """What a device (or the node) was born with in this session: metric name -> (alias, datatype)."""

    metrics: dict[str, tuple[int, int]] = field(default_factory=dict)
    ts: int = 0  # the newest sample time its birth's values had: data sampled up to then is historical


class EdgeSession:
    """seq, the aliases (stable for the process: a rebirth keeps them) and the births of one session."""

    def __init__(self, group: str, edge: str) -> None:
        self.group = group
        self.edge = edge
        self.seq = 0  # the next message's
        self.node: Born | None = None  # None: no NBIRTH in this session yet
        self.devices: dict[str, Born] = {}
        self._aliases: dict[tuple[str, str], int] = {}

    def topic(self, kind: str, device: str | None = None) -> str:
        """The message's topic below `spBv1.0/`."""
        base = f"{self.group}/{kind}/{self.edge}"
        return base if device is None else f"{base}/{device}"

    def alias(self, device: str, metric: str) -> int:
        """The metric's alias: unique across the node (its metrics and every device's), the same for the process."""
        key = (device, metric)
        alias = self._aliases.get(key)
        if alias is None:
            alias = self._aliases[key] = len(self._aliases)
        return alias

    def name_of(self, device: str, alias: int) -> str | None:
        """The metric of `device` born with `alias` in this session, if any (a host's command may name it so)."""
        born = self.devices.get(device) if device else self.node
        if born is None:
            return None
        return next((name for name, (a, _) in born.metrics.items() if a == alias), None)

    def _payload(self, now: int) -> Payload:
        payload = Payload(timestamp=now, seq=self.seq)
        self.seq = (self.seq + 1) % 256
        return payload

    # --- the node -------------------------------------------------------------------------------

    def nbirth(self, bd_seq: int, metrics: Iterable[tuple[MetricSpec, Value]], now: int) -> tuple[str, bytes]:
        """The NBIRTH: seq 0, bdSeq, Node Control/Rebirth, then the node's own metrics. Devices are born again."""
        self.seq = 0
        self.devices = {}
        payload = self._payload(now)
        born = Born(ts=now)
        # The rebirth request comes by name: the specification gives this metric no alias.
        birth_metric(payload, MetricSpec(REBIRTH, BOOLEAN, writable=True), None, False, now)
        for spec, value in [(MetricSpec(BDSEQ, INT64), bd_seq), *metrics]:
            alias = self.alias("", spec.name)
            birth_metric(payload, spec, alias, value, now)
            born.metrics[spec.name] = (alias, spec.datatype)
        self.node = born
        return self.topic("NBIRTH"), payload.SerializeToString()

    def ndata(self, values: Mapping[str, Value], now: int) -> tuple[str, bytes] | None:
        """An NDATA of the node metrics among `values` that were born; None when none was."""
        if self.node is None:
            return None
        return self._data("NDATA", None, self.node, values, now, historical=False)

    @staticmethod
    def ndeath(bd_seq: int, now: int) -> bytes:
        """The NDEATH payload (the will, and the goodbye): bdSeq only, no seq."""
        payload = Payload(timestamp=now)
        m = payload.metrics.add()
        m.name = BDSEQ
        m.datatype = INT64
        m.timestamp = now
        set_value(m, INT64, bd_seq)
        return payload.SerializeToString()

    # --- devices --------------------------------------------------------------------------------

    def dbirth(
        self, device: str, specs: Iterable[MetricSpec], values: Mapping[str, Value], ts: int, now: int
    ) -> tuple[str, bytes]:
        """A DBIRTH with every metric of `specs`, each with its value in `values` (null if none), sampled at `ts`."""
        payload = self._payload(now)
        born = Born(ts=ts)
        for spec in specs:
            alias = self.alias(device, spec.name)
            birth_metric(payload, spec, alias, values.get(spec.name), ts or now)
            born.metrics[spec.name] = (alias, spec.datatype)
        self.devices[device] = born
        return self.topic("DBIRTH", device), payload.SerializeToString()

    def needs_birth(self, device: str, values: Mapping[str, Value]) -> bool:
        """True when `device` was not born in this session, or `values` has a metric its birth lacks or cannot hold."""
        born = self.devices.get(device)
        if born is None:
            return True
        for name, value in values.items():
            known = born.metrics.get(name)
            if known is None or not fits(known[1], value):
                return True
        return False

    def ddata(self, device: str, values: Mapping[str, Value], ts: int, now: int) -> tuple[str, bytes] | None:
        """A DDATA of the born metrics among `values`, historical when sampled before the birth's values."""
        born = self.devices.get(device)
        if born is None or ts == born.ts:
            return None  # a sample its birth already carried (the birth took the device's latest values)
        return self._data("DDATA", device, born, values, ts, historical=ts < born.ts, now=now)

    def ddeath(self, device: str, now: int) -> tuple[str, bytes] | None:
        """A DDEATH for a device born in this session (None for one that was not)."""
        if self.devices.pop(device, None) is None:
            return None
        return self.topic("DDEATH", device), self._payload(now).SerializeToString()

    def _data(
        self,
        kind: str,
        device: str | None,
        born: Born,
        values: Mapping[str, Value],
        ts: int,
        historical: bool,
        now: int | None = None,
    ) -> tuple[str, bytes] | None:
        known = [(born.metrics[name], value) for name, value in values.items() if name in born.metrics]
        if not known:
            return None
        payload = self._payload(ts if now is None else now)
        for (alias, datatype), value in known:
            data_metric(payload, alias, datatype, value, ts, historical)
        return self.topic(kind, device), payload.SerializeToString()


def specs_for(declared: Iterable[MetricSpec] | None, seen: Mapping[str, Value]) -> list[MetricSpec]:
    """A device's birth metrics: the declared ones, then one per value seen that none declares (or that the
    declared datatype cannot hold: the value's own datatype replaces it)."""
    out: dict[str, MetricSpec] = {}
    for spec in declared or ():
        out[spec.name] = spec
    for name, value in seen.items():
        known = out.get(name)
        if known is None or not fits(known.datatype, value):
            # A declared metric keeps its unit, range and writability: only its datatype grows to the value's.
            out[name] = (
                MetricSpec(name, datatype_of(value)) if known is None else replace(known, datatype=datatype_of(value))
            )
    return list(out.values())
