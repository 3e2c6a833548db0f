"""Cross-checks of the northbound sinks against each other: one MQTT client id per broker."""

from __future__ import annotations

from .checkbase import CheckBase
from .checks_sparkplug import broker_key


class SinkChecks(CheckBase):
    """Sinks that would end each other's sessions."""

    def _client_ids(self) -> None:
        """Warn when two sinks would connect to one broker with one client id: the broker closes the older session
        each time the other connects, and the two take turns for ever (the gateway logs a take-over)."""
        seen: dict[tuple[str, str], int] = {}
        for s, sink in enumerate(self.config.northbound):
            explicit = sink.client_id is not None
            client_id = sink.client_id or f"fieldgate-{self.config.gateway.id}-{sink.name}"
            brokers = [broker_key(u) for u in sink.urls] if sink.urls else [broker_key(sink.url)]
            for broker in dict.fromkeys(brokers):
                first = seen.setdefault((broker, client_id), s)
                if first == s:
                    continue
                other = self.config.northbound[first]
                named = "" if explicit else " (the default, fieldgate-<gateway.id>-<sink name>)"
                self._warn(
                    self._key_or(("northbound", s), "client_id"),
                    f"sink {sink.name!r} would connect to {broker} with client id {client_id!r}{named}, as sink "
                    f"{other.name!r} does (line {self._line(('northbound', first))}): the broker ends one session "
                    "whenever the other connects; give one of them another client_id",
                )
                break
