"""The router: samples become topics (deadband, snapshots, retained values); set requests become writes.

A sample the gateway stamped (not a device's own ts) while the clock is known not synchronised gives its messages
an anchor (gateway.types.ProcessClock): the outbox dates them again when they go out, the telemetry's payload
through `restamp`, so that what was queued or spooled before NTP set the clock goes out on the set clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bridge.outbox import Outbox
from gateway.device_requests import Audit, DeviceRequests
from gateway.errors import SinkError
from gateway.jsonsafe import dumps_safe, is_utf8, utf8_text
from gateway.types import CLOCK, DeviceProfile, DeviceState, Message, RequestMeta, Sample, Value

if TYPE_CHECKING:
    from gateway.clock import SyncState

log = logging.getLogger(__name__)

#: Topics each sink subscribes to (relative to its prefix).
SUBSCRIPTIONS = ("+/set/+", "+/cmd")
#: Where the clock's sync state is retained (relative to the prefix): P/status/clock.
CLOCK_TOPIC = "status/clock"


@dataclass
class _DeviceView:
    """What has been published of one device."""

    profile: DeviceProfile
    published: dict[str, Value] = field(default_factory=dict)
    latest: dict[str, Value] = field(default_factory=dict)
    latest_ts: int = 0
    last_full: float = float("-inf")
    online: bool | None = None


#: Everything the router encodes goes through the one writer that cannot raise (a value a device sent, a `cmd`'s
#: `id`, a 10^400 ts): the name stays for the callers that know it.
encode_json = dumps_safe

#: How every JSON payload the gateway dates begins (telemetry, P/metrics: compact, "ts" first).
_TS_FIRST = re.compile(rb'\{"ts":-?[0-9]+(?=[,}])')


def restamp(message: Message, ts: int) -> Message:
    """`message` dated `ts`: its `ts`, and the "ts" of its payload where it carries one (telemetry, P/metrics)."""
    topic = message.topic
    if not (topic.endswith("/telemetry") or topic == "metrics"):
        return dataclasses.replace(message, ts=ts)
    payload, done = _TS_FIRST.subn(b'{"ts":%d' % ts, message.payload, count=1)
    if not done:  # not as the gateway writes it (a payload of an older format): rewritten only if it is JSON
        try:
            body = json.loads(message.payload)
        except ValueError:
            body = None
        if not isinstance(body, dict) or "ts" not in body:
            return dataclasses.replace(message, ts=ts)
        payload = encode_json({**body, "ts": ts})
    return dataclasses.replace(message, payload=payload, ts=ts)


#: Characters a value name may not have: MQTT wildcards, the level separator, NUL (not a topic level then).
_NOT_IN_NAMES = frozenset("+#/\0")


def _clean_value(value: object) -> Value:
    """A value every encoder takes: text made valid Unicode, anything not a JSON scalar as its JSON text."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return utf8_text(value)
    return dumps_safe(value).decode("utf-8")


def _topic_level(name: object) -> bool:
    """True when `name` can be one level of an MQTT topic (and a key everywhere else)."""
    if not isinstance(name, str) or not name or len(name) > 256:
        return False
    return is_utf8(name) and _NOT_IN_NAMES.isdisjoint(name)


def _moved(old: Value, new: Value, deadband: float) -> bool:
    """Whether `new` is more than the deadband away from the published `old`; total for any two values."""
    if (
        isinstance(old, bool)
        or isinstance(new, bool)
        or not isinstance(old, int | float)
        or not isinstance(new, int | float)
    ):
        return old != new
    # isnan() of an int past float range raises: only floats are ever NaN.
    old_nan, new_nan = isinstance(old, float) and math.isnan(old), isinstance(new, float) and math.isnan(new)
    if old_nan or new_nan:
        return old_nan != new_nan
    if deadband <= 0:
        return new != old
    try:
        return abs(new - old) > deadband
    except OverflowError:  # an int past float range against a float: as far apart as values get
        return True


class Router:
    """Turns driver events into messages for every sink, and sink requests into driver calls."""

    def __init__(
        self,
        outboxes: list[Outbox],
        profiles: list[DeviceProfile],
        *,
        clock: Callable[[], float] = time.monotonic,
        audit: Audit | None = None,
    ) -> None:
        self.outboxes = outboxes
        self.devices = {p.name: _DeviceView(p) for p in profiles}
        self._clock = clock
        # Through a lambda: the requests read the router's clock as it is at each call.
        self.requests = DeviceRequests(self._profile, self._answer, clock=lambda: self._clock(), audit=audit)
        self.requests.set_rates(profiles)
        #: Values whose name could not be a topic level (no validating driver lets one through; counted if one does).
        self.dropped_values = 0
        #: The retained `status/clock` payload, once the clock watch has told a sync state (clock_changed).
        self.clock_status: bytes | None = None

    def update(self, profiles: list[DeviceProfile]) -> list[str]:
        """Take the devices of a reloaded config; returns the names of those removed.

        A device that stays keeps what was published of it (deadbands and snapshots carry on). Retained
        values the gateway no longer stands behind (a removed point, a removed device's points) are
        cleared with an empty retained message; a removed device's status is left `offline`.
        """
        old, self.devices = self.devices, {}
        for profile in profiles:
            view = old.pop(profile.name, None) or _DeviceView(profile)
            view.profile = profile
            if profile.points is not None:
                gone = [k for k in view.published if k.split(".", 1)[0] not in profile.points]
                self._clear(profile.name, view, gone)
                for key in [k for k in view.latest if k.split(".", 1)[0] not in profile.points]:
                    del view.latest[key]
            self.devices[profile.name] = view
        self.requests.set_rates(profiles)
        for name, view in old.items():
            self._send(Message(f"{name}/status", b"offline", retain=True))
            self._clear(name, view, list(view.published))
        return list(old)

    def _clear(self, device: str, view: _DeviceView, points: list[str]) -> None:
        for point in points:
            del view.published[point]
            # An empty retained message deletes the broker's retained value (MQTT 3.1.1, 3.3.1.3).
            self._send(Message(f"{device}/{point}", b"", retain=True))

    # --- from the drivers ---------------------------------------------------------------------------

    def on_sample(self, sample: Sample) -> None:
        """Publish what moved beyond its deadband, the per-point values, and a snapshot when due."""
        telemetry = self._route(sample)
        if telemetry is not None:
            self._send(telemetry)

    def deliver(self, sample: Sample) -> asyncio.Future[Any]:
        """Like on_sample; the future resolves once every sink holds the telemetry durably (SinkError if not).

        Queued at once, behind the per-point messages _route queues: frame order is kept. A plain
        future, not a task: this runs for every MCP DATA frame.
        """
        loop = asyncio.get_running_loop()
        try:
            if sample.device not in self.devices or not self.outboxes:
                # An ACK promises the data is kept: refuse rather than ACK what nobody will store.
                raise SinkError(f"no sink takes data from {sample.device!r} now")
            telemetry = self._route(sample)
            if telemetry is None:
                done: asyncio.Future[Any] = loop.create_future()
                done.set_result(None)
                return done
            futures = [outbox.put(telemetry, awaited=True) for outbox in self.outboxes]
        except SinkError as exc:
            failed: asyncio.Future[Any] = loop.create_future()
            failed.set_exception(exc)
            return failed
        return futures[0] if len(futures) == 1 else asyncio.gather(*futures)

    def _route(self, sample: Sample) -> Message | None:
        """Queue the retained per-point messages; return the telemetry message, if any is due."""
        view = self.devices.get(sample.device)
        if view is None:
            log.debug("sample from unknown device %s", sample.device)
            return None
        values = self._accepted(view, sample)
        deadbands = view.profile.deadbands
        changed: dict[str, Value] = {}
        for name, value in values.items():
            base = name.split(".", 1)[0]
            if name not in view.published or _moved(view.published[name], value, deadbands.get(base, 0.0)):
                changed[name] = value
        view.latest.update(values)
        view.latest_ts = sample.ts
        now = self._clock()
        if now - view.last_full >= view.profile.full_every:
            view.last_full = now
            body = dict(view.latest)
        else:
            body = dict(values) if view.profile.every_sample else changed
        view.published.update(changed)
        # A device's own ts is not on the gateway's clock: the gateway's steps do not move it.
        anchor = None if sample.device_clock else CLOCK.anchor(sample.ts)
        for name, value in changed.items():
            topic = f"{sample.device}/{name}"
            self._send(Message(topic, encode_json(value), retain=True, ts=sample.ts, anchor=anchor))
        if not body:
            return None
        payload = encode_json({"ts": sample.ts, "values": body})
        return Message(f"{sample.device}/telemetry", payload, ts=sample.ts, anchor=anchor)

    def _accepted(self, view: _DeviceView, sample: Sample) -> dict[str, Value]:
        """The sample's values as the router keeps them: names that are topic levels, values every encoder takes.

        Only what is kept here is encoded later (retained state on every reconnect, the status page), so a value
        no encoder takes must not get in: it would fail each of those calls, for every device, from then on.
        """
        values = sample.values
        clean = True
        for name, value in values.items():
            # Fast path: a name seen before was checked then; numbers and ASCII text need nothing.
            if (name not in view.latest and not _topic_level(name)) or not (
                value is None or isinstance(value, bool | int | float) or (isinstance(value, str) and value.isascii())
            ):
                clean = False
                break
        if clean:
            return values
        kept: dict[str, Value] = {}
        for name, value in values.items():
            if name in view.latest or _topic_level(name):
                kept[name] = _clean_value(value)
            else:
                self.dropped_values += 1
                if self.dropped_values == 1 or self.dropped_values % 1000 == 0:
                    log.warning(
                        "device %s: value name %s cannot be a topic level; dropped (%d so far)",
                        sample.device,
                        ascii(name)[:80],
                        self.dropped_values,
                    )
        return kept

    def on_state(self, state: DeviceState) -> None:
        """Publish a device's retained online/offline status."""
        view = self.devices.get(state.device)
        if view is not None:
            view.online = state.online
        self._send(Message(f"{state.device}/status", b"online" if state.online else b"offline", retain=True))

    def _send(self, message: Message, only: Outbox | None = None) -> None:
        for outbox in self.outboxes:
            if only is None or outbox is only:
                outbox.put(message)

    def retained_state(self) -> list[Message]:
        """Every retained message the gateway stands behind (statuses and latest values); never raises."""
        out: list[Message] = []
        for name, view in self.devices.items():
            if view.online is not None:
                out.append(Message(f"{name}/status", b"online" if view.online else b"offline", retain=True))
            for point, value in view.published.items():
                out.append(Message(f"{name}/{point}", encode_json(value), retain=True))
        return out

    def republish(self, outbox: Outbox) -> None:
        """Give a (re)connected sink the retained state again: its broker may have lost it."""
        for message in self.retained_state():
            outbox.put(message)
        if self.clock_status is not None:
            outbox.put(Message(CLOCK_TOPIC, self.clock_status, retain=True))

    def clock_changed(self, state: SyncState) -> bytes:
        """The clock's sync state, first known or changed: retained on `status/clock` of every sink (`P/status` itself
        stays `online`/`offline`, the last will that availability checks read); returns the payload."""
        payload = self.clock_status = encode_json({"synchronized": state.synchronized, "source": state.source})
        for outbox in self.outboxes:
            # Not spooled for a sink that is away: its reconnect republishes the state as it is then.
            if outbox.sink.connected:
                outbox.put(Message(CLOCK_TOPIC, payload, retain=True))
        return payload

    # --- from the sinks -----------------------------------------------------------------------------

    def on_request(self, outbox: Outbox, topic: str, payload: bytes, meta: RequestMeta | None = None) -> None:
        """Handle `<device>/set/<point>` and `<device>/cmd` from a sink; the result goes back to it."""
        self.requests.on_request(outbox, topic, payload, meta)

    @property
    def dropped_requests(self) -> dict[str, int]:
        """Per sink: set/cmd requests no device would see, dropped beyond the sink's limit (not audited or answered)."""
        return self.requests.dropped

    def _profile(self, device: str) -> DeviceProfile | None:
        view = self.devices.get(device)
        return view.profile if view is not None else None

    def _answer(self, outbox: Outbox, message: Message) -> None:
        self._send(message, only=outbox)

    async def stop(self) -> None:
        """Wait briefly for writes in progress."""
        await self.requests.stop()
