"""What a Sparkplug host sends the edge node, acted on: its STATE (births wait for it), NCMD rebirth requests, and
DCMD writes handed to the gateway's `set` path. A mixin of SparkplugNode (node.py), which owns the state used here."""

from __future__ import annotations

import logging
from collections.abc import Callable

from bridge.sink import MqttSink
from bridge.sparkplug.inbound import device_writes, read_state, rebirth_requested
from bridge.sparkplug.payload import CommandRefused
from bridge.sparkplug.session import EdgeSession
from bridge.sparkplug.view import SetRequest, SparkplugStats
from gateway.jsonsafe import dumps_safe
from gateway.types import Message, RequestMeta

log = logging.getLogger("bridge.sparkplug")

#: A STATE's timestamp more than this ahead of the gateway's clock (ms) does not order later ones.
STATE_AHEAD_MS = 86_400_000


class HostInput:
    """STATE, NCMD and DCMD handling of an edge node."""

    name: str
    primary_host: str | None
    session: EdgeSession
    counts: SparkplugStats
    mqtt: MqttSink | None
    _on_set: SetRequest
    _clock: Callable[[], int]
    _host_ts: int  # the newest STATE's timestamp seen on this connection
    _born_for: int | None
    _dropping: bool

    @property
    def connected(self) -> bool:
        """True once this connection's births are out (the node's)."""
        raise NotImplementedError

    def birth(self) -> None:
        """NBIRTH and the DBIRTHs now (the node's)."""
        raise NotImplementedError

    def rebirth(self) -> None:
        """Births again, at most once per interval (the node's)."""
        raise NotImplementedError

    def goodbye(self) -> Message:
        """The NDEATH of this connection (the node's)."""
        raise NotImplementedError

    def on_message(self, relative: str, payload: bytes, _meta: RequestMeta | None = None) -> None:
        """A STATE, NCMD or DCMD for this node (topic below `spBv1.0/`); a DCMD's age limit is the sink's."""
        parts = relative.split("/")
        try:
            if parts[0] == "STATE":
                self._on_state(payload)
            elif len(parts) == 3 and parts[1] == "NCMD":
                if rebirth_requested(self.session, payload):
                    self.counts.rebirth_requests += 1
                    log.info("sink %s: a host asked for a rebirth", self.name)
                    self.rebirth()
            elif len(parts) == 4 and parts[1] == "DCMD":
                for name, value in device_writes(self.session, parts[3], payload):
                    self.counts.commands += 1
                    self._on_set(f"{parts[3]}/set/{name}", dumps_safe(value))
        except (CommandRefused, ValueError) as exc:
            self.counts.bad_commands += 1
            if self.counts.bad_commands == 1 or self.counts.bad_commands % 1000 == 0:
                bad = self.counts.bad_commands
                log.warning("sink %s: refused %s: %s (%d so far)", self.name, relative[:120], exc, bad)

    def _on_state(self, payload: bytes) -> None:
        state = read_state(payload)
        if state.timestamp < self._host_ts:
            return  # older than one seen: a stale retained copy
        if state.timestamp <= self._clock() + STATE_AHEAD_MS:
            # One dated further ahead is obeyed but not kept as the newest: kept, it would make the real host's
            # later STATEs look stale. (Not refused: a Pi without a real-time clock may be days behind the host.)
            self._host_ts = state.timestamp
        was, self.counts.host_online = self.counts.host_online, state.online
        if state.online:
            if was is not True:
                log.info("sink %s: primary host %s is online", self.name, self.primary_host)
            if self.mqtt is not None and self.mqtt.connected and not self.connected:
                self.birth()
            return
        log.warning("sink %s: primary host %s is offline: data stays in the spool", self.name, self.primary_host)
        if self.connected and self.mqtt is not None:
            # The specification: NDEATH, disconnect, connect again (a new bdSeq) and wait for the host.
            self._born_for = None
            self._dropping = True  # until the next connection: an `online` read meanwhile births nothing here
            sent = self.mqtt.try_publish(self.goodbye())
            if sent is not None:  # its PUBACK may not come before the disconnect: nobody waits for it
                sent.add_done_callback(lambda f: f.cancelled() or f.exception())
            self.mqtt.drop()
