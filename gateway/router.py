"""The router: samples become topics (deadband, snapshots, retained values); set requests become writes."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bridge.outbox import Outbox
from gateway.audit import AuditRecord
from gateway.errors import SinkError
from gateway.types import Command, CommandResult, DeviceState, Message, Sample, Value, Write, WriteResult

log = logging.getLogger(__name__)

Writer = Callable[[Write], Awaitable[WriteResult]]
Commander = Callable[[Command], Awaitable[CommandResult]]
Audit = Callable[[AuditRecord], None]

#: Topics each sink subscribes to (relative to its prefix).
SUBSCRIPTIONS = ("+/set/+", "+/cmd")


@dataclass(frozen=True)
class DeviceProfile:
    """What the router needs to know of a device: deadbands, snapshot period, how to write it."""

    name: str
    full_every: float = 60.0
    deadbands: dict[str, float] = field(default_factory=dict)
    writer: Writer | None = None
    commander: Commander | None = None
    every_sample: bool = False  # devices that push (MCP): each sample is published whole
    write_rate: float | None = None  # writes or commands per second; None: unlimited
    write_burst: int = 10
    points: frozenset[str] | None = None  # the configured points; None: the device pushes what it has (MCP)


class TokenBucket:
    """`rate` per second on average, up to `burst` at once."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass
class _DeviceView:
    """What has been published of one device."""

    profile: DeviceProfile
    published: dict[str, Value] = field(default_factory=dict)
    latest: dict[str, Value] = field(default_factory=dict)
    latest_ts: int = 0
    last_full: float = float("-inf")
    online: bool | None = None


def encode_json(value: object) -> bytes:
    """Compact JSON; NaN and infinities (not JSON) become null."""
    return json.dumps(_finite(value), separators=(",", ":"), ensure_ascii=False).encode()


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _moved(old: Value, new: Value, deadband: float) -> bool:
    if (
        isinstance(old, bool)
        or isinstance(new, bool)
        or not isinstance(old, int | float)
        or not isinstance(new, int | float)
    ):
        return old != new
    if math.isnan(old) or math.isnan(new):
        return math.isnan(old) != math.isnan(new)
    return abs(new - old) > deadband if deadband > 0 else new != old


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
        self._audit = audit
        self._buckets = {
            p.name: TokenBucket(p.write_rate, p.write_burst, clock()) for p in profiles if p.write_rate is not None
        }
        self._tasks: set[asyncio.Task[None]] = set()

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
            bucket = self._buckets.get(profile.name)
            if profile.write_rate is None:
                self._buckets.pop(profile.name, None)
            elif bucket is None or (bucket.rate, bucket.burst) != (profile.write_rate, profile.write_burst):
                self._buckets[profile.name] = TokenBucket(profile.write_rate, profile.write_burst, self._clock())
        for name, view in old.items():
            self._buckets.pop(name, None)
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
            futures = [outbox.enqueue(telemetry) for outbox in self.outboxes]
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
        deadbands = view.profile.deadbands
        changed: dict[str, Value] = {}
        for name, value in sample.values.items():
            base = name.split(".", 1)[0]
            if name not in view.published or _moved(view.published[name], value, deadbands.get(base, 0.0)):
                changed[name] = value
        view.latest.update(sample.values)
        view.latest_ts = sample.ts
        now = self._clock()
        if now - view.last_full >= view.profile.full_every:
            view.last_full = now
            body = dict(view.latest)
        else:
            body = dict(sample.values) if view.profile.every_sample else changed
        view.published.update(changed)
        for name, value in changed.items():
            self._send(Message(f"{sample.device}/{name}", encode_json(value), retain=True, ts=sample.ts))
        if not body:
            return None
        return Message(f"{sample.device}/telemetry", encode_json({"ts": sample.ts, "values": body}), ts=sample.ts)

    def on_state(self, state: DeviceState) -> None:
        """Publish a device's retained online/offline status."""
        view = self.devices.get(state.device)
        if view is not None:
            view.online = state.online
        self._send(Message(f"{state.device}/status", b"online" if state.online else b"offline", retain=True))

    def _send(self, message: Message, only: Outbox | None = None) -> None:
        for outbox in self.outboxes:
            if only is None or outbox is only:
                outbox.submit(message)

    def retained_state(self) -> list[Message]:
        """Every retained message the gateway stands behind (statuses and latest values)."""
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
            outbox.submit(message)

    # --- from the sinks -----------------------------------------------------------------------------

    def on_request(self, outbox: Outbox, topic: str, payload: bytes) -> None:
        """Handle `<device>/set/<point>` and `<device>/cmd` from a sink; the result goes back to it."""
        parts = topic.split("/")
        if len(parts) == 3 and parts[1] == "set":
            self._spawn(self._set(outbox, parts[0], parts[2], payload))
        elif len(parts) == 2 and parts[1] == "cmd":
            self._spawn(self._cmd(outbox, parts[0], payload))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _rate_limited(self, device: str, what: str) -> str | None:
        """The refusal when `device` has used up its write rate, else None (and a token is spent)."""
        bucket = self._buckets.get(device)
        if bucket is None or bucket.take(self._clock()):
            return None
        return f"rate limited: {device} takes at most {bucket.rate:g} {what}/s (burst {bucket.burst})"

    async def _set(self, outbox: Outbox, device: str, point: str, payload: bytes) -> None:
        arrived, started = time.time_ns(), time.monotonic()
        result_topic = f"{device}/set/{point}/result"
        value: Any = None
        raw: bytes | None = None
        try:
            value = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            raw = payload
            result = WriteResult(ok=False, error=f"payload is not JSON: {payload[:64]!r}")
        else:
            if isinstance(value, dict):
                value = value.get("value")
            view = self.devices.get(device)
            if view is None:
                result = WriteResult(ok=False, error=f"unknown device {device!r}")
            elif view.profile.writer is None:
                result = WriteResult(ok=False, error=f"{device} takes no writes")
            elif refusal := self._rate_limited(device, "writes"):
                result = WriteResult(ok=False, error=refusal)
            else:
                result = await view.profile.writer(Write(device, point, value, origin=outbox.sink.name))
        log.info("set %s.%s = %r: %s", device, point, payload[:64], "ok" if result.ok else result.error)
        body = {"ok": result.ok, "value": result.value, "error": result.error}
        self._send(Message(result_topic, encode_json(body)), only=outbox)
        if self._audit is not None:
            self._audit(
                AuditRecord(
                    ts_ns=arrived,
                    origin=outbox.sink.name,
                    topic=outbox.sink.topic(f"{device}/set/{point}"),
                    device=device,
                    action="set",
                    target=point,
                    request=value,
                    ok=result.ok,
                    result=result.value,
                    error=result.error,
                    raw=raw,
                    duration_ms=(time.monotonic() - started) * 1000,
                )
            )

    async def _cmd(self, outbox: Outbox, device: str, payload: bytes) -> None:
        arrived, started = time.time_ns(), time.monotonic()
        cmd_id: object = None
        raw: bytes | None = None
        try:
            body = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            body = None
            raw = payload
        if isinstance(body, dict):
            cmd_id = body.get("id")
        view = self.devices.get(device)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"]:
            result = CommandResult(ok=False, error='payload must be {"name": str, "args": {...}, "id": optional}')
        elif not isinstance(body.get("args", {}), dict):
            result = CommandResult(ok=False, error="args must be a JSON object")
        elif view is None:
            result = CommandResult(ok=False, error=f"unknown device {device!r}")
        elif view.profile.commander is None:
            result = CommandResult(ok=False, error=f"{device} takes no commands")
        elif refusal := self._rate_limited(device, "commands"):
            result = CommandResult(ok=False, error=refusal)
        else:
            command = Command(device, body["name"], body.get("args", {}), None if cmd_id is None else str(cmd_id))
            result = await view.profile.commander(command)
        log.info("cmd %s: %s", device, "ok" if result.ok else result.error)
        reply = {"id": cmd_id, "ok": result.ok, "result": result.result, "error": result.error}
        self._send(Message(f"{device}/cmd/result", encode_json(reply)), only=outbox)
        if self._audit is not None:
            name = body.get("name") if isinstance(body, dict) else None
            self._audit(
                AuditRecord(
                    ts_ns=arrived,
                    origin=outbox.sink.name,
                    topic=outbox.sink.topic(f"{device}/cmd"),
                    device=device,
                    action="cmd",
                    target=name if isinstance(name, str) else None,
                    request=body.get("args", {}) if isinstance(body, dict) else body,
                    ok=result.ok,
                    result=result.result,
                    error=result.error,
                    request_id=None if cmd_id is None else str(cmd_id),
                    raw=raw,
                    duration_ms=(time.monotonic() - started) * 1000,
                )
            )

    async def stop(self) -> None:
        """Wait briefly for writes in progress."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
