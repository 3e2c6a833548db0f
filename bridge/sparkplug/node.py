"""A Sparkplug B edge node: the sink a `format: sparkplug` outbox publishes through, on one MQTT connection.

The gateway hands this sink what it hands every sink (telemetry, statuses, metrics, request results); `prepare`
keeps what Sparkplug has a use for, as the outbox then queues or spools it, and `try_publish` turns each into its
Sparkplug message at the moment it goes out. So `seq`, the aliases and the historical flag are decided in one
place, in wire order, and the spool holds the gateway's own values (its replay after a host's absence is the
outbox's, in order: `order: strict`).

A session: the MQTT connection (its will is an NDEATH with the connection's bdSeq), the subscriptions, then, when
the primary host (if any) says it is online, the NBIRTH and a DBIRTH for each online device; only then is the sink
`connected` for the outbox. Data sampled no later than a device's birth values is published as historical.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

from bridge.sink import MqttSink, SinkStats
from bridge.sparkplug.bdseq import BdSeqFile
from bridge.sparkplug.host_input import HostInput
from bridge.sparkplug.prepare import NodeMetrics, Prepare
from bridge.sparkplug.session import EdgeSession, specs_for
from bridge.sparkplug.view import DevicesNow, SetRequest, SparkplugStats, metric_sets
from gateway.types import Message, Value, now_ms

log = logging.getLogger("bridge.sparkplug")

NAMESPACE = "spBv1.0"
#: Births at most this often on request (seconds): faster requests share one.
REBIRTH_INTERVAL = 1.0


class SparkplugNode(HostInput):
    """The Publisher of a Sparkplug sink's outbox; the MQTT connection under it is an `MqttSink` it drives."""

    def __init__(
        self,
        name: str,
        *,
        group: str,
        edge: str,
        primary_host: str | None,
        bdseq: BdSeqFile,
        devices: DevicesNow,
        node_metrics: NodeMetrics,
        on_set: SetRequest,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.name = name
        self.primary_host = primary_host
        self.session = EdgeSession(group, edge)
        self.counts = SparkplugStats()
        self.mqtt: MqttSink | None = None
        self._bdseq = bdseq
        self._bd_seq = bdseq.value or 0
        self._devices = devices
        self._node_metrics = node_metrics
        self._on_set = on_set
        self._clock = clock
        self._born_for: int | None = None  # the MQTT connection (its connects count) whose births are out
        self._ready = asyncio.Event()
        self._host_ts = -1  # the newest STATE's timestamp seen
        self._prepare = Prepare(node_metrics, clock)
        self.prepare = self._prepare.prepare  # the outbox's (prepare.py)
        self._history_born: set[str] = set()  # offline devices born only to carry their stored data
        self._born_with: object = None  # the devices' and the node's metric sets of the last births
        self._last_birth = float("-inf")  # loop time of the last births
        self._rebirth_later: asyncio.TimerHandle | None = None
        self._born_at: dict[str, float] = {}  # loop time of each device's last DBIRTH
        self._dbirths_due: dict[str, asyncio.TimerHandle] = {}
        self._dropping = False  # the host went offline: this connection is being closed

    # --- what the MQTT connection is built with -------------------------------------------------

    def attach(self, mqtt: MqttSink) -> None:
        """Take the connection this node publishes on (built with the hooks below)."""
        self.mqtt = mqtt

    def connect_to(self, url: str, **options: Any) -> MqttSink:
        """The MQTT connection of this node to `url` (its namespace, QoS 0, its will, subscriptions and hooks),
        attached; `options`: the sink's own (client id, credentials, TLS, keepalive, supervisor)."""
        mqtt = MqttSink(
            self.name,
            url,
            NAMESPACE,
            qos=0,
            subscriptions=self.subscriptions,
            on_request=self.on_message,
            on_connect=self.on_connect,
            will=self.will,
            goodbye=self.goodbye,
            announce=False,
            retained_ok=self.retained_ok,
            **options,
        )
        self.attach(mqtt)
        return mqtt

    @property
    def subscriptions(self) -> tuple[str, ...]:
        """Below `spBv1.0/`: the node's and its devices' commands, and the primary host's STATE."""
        own = (self.session.topic("NCMD"), self.session.topic("DCMD", "+"))
        return own + ((f"STATE/{self.primary_host}",) if self.primary_host else ())

    def will(self) -> Message:
        """The will of a new connection: an NDEATH with the next bdSeq (kept in the state dir before it is used)."""
        self._bd_seq = self._bdseq.next()
        # A STATE's time counts within one connection: the retained one comes again on the new subscription, and
        # one far in the future (a host's clock, or garbage) must not make every later STATE look stale for good.
        self._host_ts = -1
        self._dropping = False
        if self.counts.host_online is not None:
            self.counts.host_online = None  # not heard on this connection yet: births wait for its STATE
        return self._ndeath()

    def goodbye(self) -> Message:
        """The NDEATH published before a clean disconnect (it would not fire the will)."""
        return self._ndeath()

    def _ndeath(self) -> Message:
        return Message(self.session.topic("NDEATH"), self.session.ndeath(self._bd_seq, self._clock()), qos=1)

    def retained_ok(self, relative: str) -> bool:
        """The primary host's STATE is retained by design: it is state to take, not a stale request."""
        return self.primary_host is not None and relative == f"STATE/{self.primary_host}"

    # --- the Publisher the outbox sees ------------------------------------------------------------

    @property
    def stats(self) -> SparkplugStats:
        """The sink's counters (the MQTT connection's and the node's), for P/metrics and /metrics."""
        if self.mqtt is not None:
            for f in fields(SinkStats):
                setattr(self.counts, f.name, getattr(self.mqtt.stats, f.name))
        return self.counts

    @property
    def connected(self) -> bool:
        """True once this connection's births are out: until then the outbox spools."""
        return self.mqtt is not None and self.mqtt.connected and self._born_for == self.mqtt.stats.connects

    def topic(self, relative: str) -> str:
        """The full topic of a gateway-relative one; a `set` request is named by the DCMD it came as."""
        parts = relative.split("/", 2)  # a point name may hold "/" (a DCMD's folders): the device is the first level
        if len(parts) == 3 and parts[1] == "set":
            return f"{NAMESPACE}/{self.session.topic('DCMD', parts[0])}"
        return f"{NAMESPACE}/{relative}"

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a session with its births out."""
        if self.connected:
            return True
        self._ready.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        except TimeoutError:
            return False
        return self.connected

    async def start(self) -> None:
        """Start connecting; the births follow the connection (and the primary host's STATE)."""
        assert self.mqtt is not None
        await self.mqtt.start()

    async def stop(self) -> None:
        """Publish the NDEATH and disconnect."""
        for timer in [self._rebirth_later, *self._dbirths_due.values()]:
            if timer is not None:
                timer.cancel()
        if self.mqtt is not None:
            await self.mqtt.stop()

    def try_publish(self, message: Message) -> asyncio.Future[None] | None:
        """Publish the Sparkplug message(s) a prepared message makes now; None while no session is born."""
        if not self.connected:
            return None
        now = self._clock()
        device, _, rest = message.topic.partition("/")
        if rest == "status":
            return self._send(self._status(device, message.payload == b"online", message.ts or now, now))
        if rest != "telemetry" and message.topic != "metrics":
            return self._done()
        try:
            body = json.loads(message.payload)
            values, ts = body["values"], int(body["ts"])
            if not isinstance(values, dict):
                raise TypeError("values is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            # Not what prepare() makes: a spool written by this sink as a JSON one (its format changed), or damaged.
            log.warning("sink %s: dropped a stored %s that is not Sparkplug's to send: %s", self.name, rest, exc)
            return self._done()
        if rest == "telemetry":
            return self._send(self._telemetry(device, values, ts, now))
        node = self.session.node
        if node is None or ts < node.ts:
            return self._done()  # node metrics stored before this session's NBIRTH, which carried newer ones
        data = self.session.ndata(values, now)
        return self._send([data] if data is not None else [])

    def _telemetry(self, device: str, values: dict[str, Value], ts: int, now: int) -> list[tuple[str, bytes]]:
        """A device's DDATA, after a DBIRTH if its birth lacks a metric or cannot hold a value."""
        out = []
        born = self.session.devices.get(device)
        if self.session.needs_birth(device, values):
            if born is not None and ts < born.ts:
                pass  # a stored value of another type does not change what the birth declares now: it goes null
            elif self._born_lately(device):
                self._dbirth_later(device)  # meanwhile what its birth cannot hold goes out null or not at all
            else:
                birth = self._dbirth(device, now, extra=values)
                if birth is None:
                    return []  # a device the gateway no longer has
                out.append(birth)
        data = self.session.ddata(device, values, ts, now)
        if data is not None:
            out.append(data)
        if ts > self.session.devices[device].ts:
            out += self._bury_history(now)
        return out

    def _born_lately(self, device: str) -> bool:
        """True when `device` was born less than REBIRTH_INTERVAL ago: a device whose values keep changing type
        gets one DBIRTH a second, not one a message (until then a value its datatype cannot hold goes out null)."""
        born_at = self._born_at.get(device)
        lately = born_at is not None and asyncio.get_running_loop().time() - born_at < REBIRTH_INTERVAL
        return lately and device in self.session.devices

    def _dbirth_later(self, device: str) -> None:
        """One DBIRTH of `device` at the end of its REBIRTH_INTERVAL, with the values the gateway has then (the
        router's latest: what went out null meanwhile is in it)."""
        if device in self._dbirths_due:
            return
        loop = asyncio.get_running_loop()
        wait = self._born_at[device] + REBIRTH_INTERVAL - loop.time()
        self._dbirths_due[device] = loop.call_later(max(0.0, wait), self._deferred_dbirth, device)

    def _deferred_dbirth(self, device: str) -> None:
        self._dbirths_due.pop(device, None)
        if self.connected and device in self.session.devices:
            birth = self._dbirth(device, self._clock())
            if birth is not None:
                self._send([birth])

    def _status(self, device: str, online: bool, ts: int, now: int) -> list[tuple[str, bytes]]:
        stale = self.session.node is not None and ts < self.session.node.ts
        if stale and not (not online and device in self._history_born):
            # This session's births already say how the device is now, but one born for its stored data is
            # offline: its stored `offline` ends that birth where it happened.
            return []
        if online:
            if device in self.session.devices:
                return []
            birth = self._dbirth(device, now)
            return [birth] if birth is not None else []
        self._history_born.discard(device)
        death = self.session.ddeath(device, min(ts, now))  # when it went offline (a stored one: back then)
        if death is None:
            return []
        self.counts.device_deaths += 1
        return [death]

    def _bury_history(self, now: int) -> list[tuple[str, bytes]]:
        """DDEATHs for offline devices born only for their stored data, once live data flows again."""
        if not self._history_born:
            return []
        online = {d.name for d in self._devices() if d.online}
        out = []
        for name in sorted(self._history_born - online):
            death = self.session.ddeath(name, now)
            if death is not None:
                self.counts.device_deaths += 1
                out.append(death)
        self._history_born.clear()
        return out

    def _send(self, out: list[tuple[str, bytes]]) -> asyncio.Future[None] | None:
        assert self.mqtt is not None
        fut: asyncio.Future[None] | None = None
        for topic, payload in out:
            fut = self.mqtt.try_publish(Message(topic, payload, qos=0))
            if fut is None:
                return None  # the connection went just now: the next one births again
        return fut if fut is not None else self._done()

    @staticmethod
    def _done() -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    # --- births -----------------------------------------------------------------------------------

    def _dbirth(self, device: str, now: int, extra: Mapping[str, Value] | None = None) -> tuple[str, bytes] | None:
        """A DBIRTH of `device` as the gateway has it now (with `extra`'s metrics if its birth lacks them)."""
        found = next((d for d in self._devices() if d.name == device), None)
        if found is None or not (found.values or extra):
            return None  # gone, or no value yet (a device that just connected): born with its first data
        seen = {**found.values, **(extra or {})}
        # Without values (silent since a restart, its stored data going out now) the birth says "unknown as of
        # now": what was sampled before it is historical.
        ts = found.ts if found.values else now
        birth = self.session.dbirth(device, specs_for(found.specs, seen), found.values, ts, now)
        if not found.online:
            self._history_born.add(device)
        self.counts.device_births += 1
        self._born_at[device] = asyncio.get_running_loop().time()
        return birth

    def _may_birth(self) -> bool:
        """Whether births may go out now: connected, not disconnecting, and the primary host (if any) online."""
        if self.mqtt is None or not self.mqtt.connected or self._dropping:
            return False
        return self.primary_host is None or self.counts.host_online is True

    def birth(self) -> None:
        """NBIRTH and a DBIRTH for each online device, now; the outbox may publish once they are out."""
        if not self._may_birth():
            return
        now = self._clock()
        node_metrics, devices = self._node_metrics(), self._devices()
        self._born_with = metric_sets(node_metrics, devices)
        out = [self.session.nbirth(self._bd_seq, node_metrics, now)]
        self._prepare.put.node.update((spec.name, value) for spec, value in node_metrics)  # the host has these now
        self._history_born.clear()
        for device in devices:
            if device.online and device.values:
                specs = specs_for(device.specs, device.values)
                out.append(self.session.dbirth(device.name, specs, device.values, device.ts, now))
                self.counts.device_births += 1
                self._born_at[device.name] = asyncio.get_running_loop().time()
        self.counts.births += 1
        self._last_birth = asyncio.get_running_loop().time()
        assert self.mqtt is not None
        self._born_for = self.mqtt.stats.connects
        if self._send(out) is None:
            self._born_for = None
            return
        self._ready.set()
        log.info("sink %s: NBIRTH (bdSeq %d) and %d DBIRTH(s) published", self.name, self._bd_seq, len(out) - 1)

    def rebirth(self) -> None:
        """Births again (a host asked, or the devices or their points changed): only in a born session.

        At most one per REBIRTH_INTERVAL: requests that come faster (a host that asks on every gap, or one that
        floods) are answered by one rebirth at the end of the interval, not one each.
        """
        if not self.connected:
            return
        loop = asyncio.get_running_loop()
        wait = self._last_birth + REBIRTH_INTERVAL - loop.time()
        if wait <= 0:
            self.birth()
        elif self._rebirth_later is None:
            # Data stops now (the specification), the births come at the end of the interval.
            self._born_for = None
            self._rebirth_later = loop.call_later(wait, self._deferred_rebirth)

    def _deferred_rebirth(self) -> None:
        self._rebirth_later = None
        if not self.connected and self._may_birth():
            self.birth()

    def refresh(self) -> None:
        """Births again if the devices or the metrics they declare changed (a reload): hosts learn metrics there."""
        if self.connected and metric_sets(self._node_metrics(), self._devices()) != self._born_with:
            log.info("sink %s: the devices or their metrics changed: births again", self.name)
            self.birth()

    async def on_connect(self) -> None:
        """A new connection: births at once, or once the primary host's STATE says it is online.

        With a primary host the births wait for its STATE on this connection (retained: it comes right after the
        subscription), even if the last one said online: the host may have left while we were away.
        """
        if self.primary_host is None and not self.connected:
            self.birth()
