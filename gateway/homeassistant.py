"""Home Assistant MQTT discovery: a retained config per point, removed when the point leaves the config.

Single-component discovery as documented at https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery:
each point (each named bit of a bitfield point) gets `<discovery_prefix>/<component>/<object id>/config`
with the object id `<gateway>_<device>_<point>`, which is also the entity's `unique_id`. The payloads
name full topics, so every sink gets its own, under its own prefix; the discovery topics themselves are
absolute (outside the prefix). An empty retained payload removes an entity; what was published is
remembered in `<state_dir>/homeassistant.json`, so that a point gone from the config after a restart
(or discovery switched off) has its config removed.

Our per-point topics carry the bare JSON value, so numbers need no `value_template`; bools arrive as
`true`/`false` (the `payload_on`/`payload_off`) and strings as JSON strings (hence `{{ value_json }}`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import __version__
from gateway.config.ha_entities import Entity, entities, object_id
from gateway.errors import SinkError
from gateway.ha_state import STATE_FILE, load_published, save_published
from gateway.types import Message, absolute

if TYPE_CHECKING:
    from bridge.outbox import Outbox
    from gateway.config.schema import Config

log = logging.getLogger(__name__)

ORIGIN = {"name": "Fieldgate", "sw_version": __version__}
#: Bool values are JSON on our topics; HA compares these strings and sends them to the set topic.
PAYLOAD_ON, PAYLOAD_OFF = "true", "false"


def _gateway_device(gateway: str) -> dict[str, Any]:
    return {
        "identifiers": [f"fieldgate_{gateway}"],
        "name": gateway,
        "manufacturer": "Fieldgate",
        "model": "Fieldgate gateway",
        "sw_version": __version__,
    }


def _availability(*topics: str) -> list[dict[str, str]]:
    return [{"topic": t, "payload_available": "online", "payload_not_available": "offline"} for t in topics]


def gateway_config(gateway: str, prefix: str) -> dict[str, Any]:
    """The gateway's own entity: its `P/status` as a connectivity sensor (the device the others are `via`)."""
    # Without an entity of its own the gateway would be no device in HA's registry, and every field
    # device's `via_device` would name a device Home Assistant does not know.
    return {
        "name": "status",
        "unique_id": f"{gateway}_status",
        "state_topic": f"{prefix}/status",
        "payload_on": "online",
        "payload_off": "offline",
        "device_class": "connectivity",
        "entity_category": "diagnostic",
        "device": _gateway_device(gateway),
        "origin": ORIGIN,
        "qos": 1,
    }


def entity_config(gateway: str, prefix: str, e: Entity) -> dict[str, Any]:
    """The discovery payload of one entity, its topics under `prefix` (the sink's topic prefix)."""
    body: dict[str, Any] = {
        "name": e.point,
        "unique_id": object_id(gateway, e.device, e.point),
        "state_topic": f"{prefix}/{e.device}/{e.point}",
        # The device's status alone would stay `online` (retained) after the gateway itself vanished.
        "availability": _availability(f"{prefix}/status", f"{prefix}/{e.device}/status"),
        "availability_mode": "all",
        "device": {
            "identifiers": [f"fieldgate_{gateway}_{e.device}"],
            "name": e.device,
            "model": e.model,
            "via_device": f"fieldgate_{gateway}",
        },
        "origin": ORIGIN,
        "qos": 1,
    }
    if e.component in ("number", "switch", "text"):
        body["command_topic"] = f"{prefix}/{e.device}/set/{e.point}"
    if e.kind == "bool":
        body["payload_on"], body["payload_off"] = PAYLOAD_ON, PAYLOAD_OFF
    elif e.kind == "string":
        body["value_template"] = "{{ value_json }}"  # the topic carries a JSON string, quotes and all
        if e.component == "text":
            body["command_template"] = "{{ value | to_json }}"  # the set topic takes JSON
    if e.component == "number":
        body.update({"min": e.minimum, "max": e.maximum, "step": e.step})
    elif e.component == "text":
        body.update({"min": 0, "max": int(e.maximum or 0)})
    optional = {
        "unit_of_measurement": e.unit,
        "device_class": e.device_class if e.component != "text" else None,  # text has no device classes
        "state_class": e.state_class if e.component == "sensor" else None,
        "icon": e.icon,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def configs(cfg: Config, prefix: str) -> dict[str, dict[str, Any]]:
    """Discovery topic -> payload for every entity of the config (the gateway's own first), topics under `prefix`."""
    gw = cfg.gateway.id
    base = cfg.homeassistant.discovery_prefix
    out = {f"{base}/binary_sensor/{gw}_status/config": gateway_config(gw, prefix)}
    for e in entities(cfg):
        out[f"{base}/{e.component}/{object_id(gw, e.device, e.point)}/config"] = entity_config(gw, prefix, e)
    return out


def _encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def discovery_messages(cfg: Config, prefix: str) -> list[Message]:
    """The retained discovery messages for a sink publishing under `prefix`."""
    return [Message(absolute(t), _encode(p), retain=True, qos=1) for t, p in configs(cfg, prefix).items()]


def removal_messages(topics: Iterable[str]) -> list[Message]:
    """Empty retained payloads: Home Assistant removes those entities, the broker forgets the configs."""
    return [Message(absolute(t), b"", retain=True, qos=1) for t in sorted(topics)]


class Discovery:
    """Keeps Home Assistant's discovery configs in step with the config, on every sink."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.path = Path(cfg.gateway.state_dir) / STATE_FILE
        enabled = cfg.homeassistant.enabled
        self.topics: set[str] = set(configs(cfg, "P")) if enabled else set()
        self.removing: asyncio.Future[Any] | None = None  # removals on their way, once sync started them
        self._messages = {s.name: discovery_messages(cfg, cfg.prefix_for(s)) for s in cfg.northbound} if enabled else {}

    def sync(self, outboxes: list[Outbox]) -> asyncio.Future[Any] | None:
        """Remove, on every sink, the configs an earlier run published that this config no longer has.

        The state file lists this run's topics before any goes out (a crash never forgets one) and drops
        the removed ones once every sink holds their removal durably. The future of that, or None.
        """
        previous = load_published(self.path)
        gone = previous - self.topics
        if previous | self.topics != previous:
            save_published(self.path, previous | self.topics)
        if not gone:
            return None
        try:
            futures = [o.put(m, awaited=True) for o in outboxes for m in removal_messages(gone)]
        except SinkError as exc:
            log.warning("home assistant: cannot remove %d discovery config(s): %s", len(gone), exc)
            return None
        self.removing = asyncio.gather(*futures)
        self.removing.add_done_callback(functools.partial(self._removed, len(gone)))
        return self.removing

    def _removed(self, count: int, done: asyncio.Future[Any]) -> None:
        if done.cancelled() or done.exception() is not None:
            error = "cancelled" if done.cancelled() else done.exception()
            log.warning("home assistant: removing %d discovery config(s) failed (next start retries): %s", count, error)
            return
        save_published(self.path, self.topics)
        log.info("home assistant: removed %d discovery config(s) of points no longer configured", count)

    def publish(self, outbox: Outbox, sink: str) -> None:
        """Give a (re)connected sink every discovery config, retained, its topics under that sink's prefix."""
        for message in self._messages.get(sink, ()):
            outbox.put(message)
