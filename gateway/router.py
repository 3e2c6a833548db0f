"""The router: samples become topics (deadband, snapshots, retained values); set requests become writes."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bridge.outbox import Outbox
from gateway.audit import AuditRecord
from gateway.errors import SinkError
from gateway.jsonsafe import JsonRejected, dumps_safe, is_utf8, loads_strict, utf8_text
from gateway.types import Command, CommandResult, DeviceProfile, DeviceState, Message, Sample, Value, Write, WriteResult

log = logging.getLogger(__name__)

Audit = Callable[[AuditRecord], None]

#: Topics each sink subscribes to (relative to its prefix).
SUBSCRIPTIONS = ("+/set/+", "+/cmd")


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


#: Everything the router encodes goes through the one writer that cannot raise (a value a device sent, a `cmd`'s
#: `id`, a 10^400 ts): the name stays for the callers that know it.
encode_json = dumps_safe

#: A request's payload longer than this is refused unread (a `set` value or a `cmd` is a few bytes).
MAX_REQUEST_PAYLOAD = 64 * 1024
#: Requests a sink may bring per second that are refused before any device sees them (for an unknown device,
#: one that takes no writes/commands, or one over its own rate), and at once: each is audited and answered, so
#: without a bound a flood of them fills the audit log (and rotates the real records out of it).
STRAY_RATE = 10.0
STRAY_BURST = 20
#: A dropped request is logged at most this often per sink.
DROP_LOG_INTERVAL = 60.0
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


def _audit_record(
    outbox: Outbox,
    arrived_ns: int,
    topic: str,
    device: str,
    action: str,
    target: str | None,
    request: Any,
    request_id: str | None = None,
    raw: bytes | None = None,
) -> Callable[..., AuditRecord]:
    """The AuditRecord of one set/cmd request that came in on `outbox`'s sink, given its outcome's fields."""
    return functools.partial(
        AuditRecord,
        ts_ns=arrived_ns,
        origin=outbox.sink.name,
        topic=outbox.sink.topic(topic),
        device=device,
        action=action,
        target=target,
        request=request,
        request_id=request_id,
        raw=raw,
    )


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
        #: Per sink: one bucket for requests refused before any device sees them (see STRAY_RATE).
        self._stray: dict[str, TokenBucket] = {}
        #: Per sink: requests dropped by that bucket (neither carried out, audited nor answered).
        self.dropped_requests: dict[str, int] = {}
        self._drop_logged: dict[str, float] = {}
        #: Values whose name could not be a topic level (no validating driver lets one through; counted if one does).
        self.dropped_values = 0

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
        for name, value in changed.items():
            self._send(Message(f"{sample.device}/{name}", encode_json(value), retain=True, ts=sample.ts))
        if not body:
            return None
        return Message(f"{sample.device}/telemetry", encode_json({"ts": sample.ts, "values": body}), ts=sample.ts)

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
                outbox.submit(message)

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
        task.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("handling a request failed: %r", exc, exc_info=exc)

    def _rate_limited(self, device: str, what: str) -> str | None:
        """The refusal when `device` has used up its write rate, else None (and a token is spent)."""
        bucket = self._buckets.get(device)
        if bucket is None or bucket.take(self._clock()):
            return None
        return f"rate limited: {device} takes at most {bucket.rate:g} {what}/s (burst {bucket.burst})"

    def _admit(self, outbox: Outbox, device: str, takes: bool, what: str) -> tuple[bool, str | None]:
        """Whether to handle a request at all, and its refusal when the device is over its rate.

        A request the device takes spends one of the device's tokens; one refused before reaching a device (no
        such device, none it takes, over the rate) spends one of the sink's as well, and is dropped without one.
        """
        refusal = self._rate_limited(device, what) if takes else None
        if (refusal or not takes) and not self._stray_ok(outbox):
            return False, refusal
        return True, refusal

    def _stray_ok(self, outbox: Outbox) -> bool:
        """Spend one of the sink's tokens for a request no device will see; False (counted) when there is none."""
        sink, now = outbox.sink.name, self._clock()
        bucket = self._stray.get(sink)
        if bucket is None:
            bucket = self._stray[sink] = TokenBucket(STRAY_RATE, STRAY_BURST, now)
        if bucket.take(now):
            return True
        dropped = self.dropped_requests[sink] = self.dropped_requests.get(sink, 0) + 1
        if now - self._drop_logged.get(sink, float("-inf")) >= DROP_LOG_INTERVAL:
            self._drop_logged[sink] = now
            log.warning(
                "sink %s: more than %g requests/s that no device takes; dropping the rest unanswered and unaudited "
                "(%d so far)",
                sink,
                STRAY_RATE,
                dropped,
            )
        return False

    def _answer(self, outbox: Outbox, topic: str, body: dict[str, Any]) -> None:
        try:
            self._send(Message(topic, encode_json(body)), only=outbox)
        except SinkError as exc:  # the sink is going away (stop, reload): nobody is left to tell
            log.info("result on %s not sent: %s", topic, exc)

    def _record(self, record: AuditRecord) -> None:
        if self._audit is None:
            return
        try:
            self._audit(record)
        except Exception:
            # The action is carried out (or refused) as asked; losing its record is worth a traceback, not more.
            log.exception("audit record of %s %s could not be written", record.action, record.topic)

    @staticmethod
    def _read(payload: bytes) -> tuple[Any, str | None]:
        """The request's JSON and None, or None and why it is refused."""
        if len(payload) > MAX_REQUEST_PAYLOAD:
            return None, f"payload of {len(payload)} bytes; requests take at most {MAX_REQUEST_PAYLOAD}"
        try:
            return loads_strict(payload), None
        except JsonRejected as exc:
            return None, f"payload is not JSON: {str(exc)[:120]}: {payload[:64]!r}"

    async def _set(self, outbox: Outbox, device: str, point: str, payload: bytes) -> None:
        arrived, started = time.time_ns(), time.monotonic()
        view = self.devices.get(device)
        writer = view.profile.writer if view is not None else None
        go_on, refusal = self._admit(outbox, device, writer is not None, "writes")
        if not go_on:
            return
        result_topic = f"{device}/set/{point}/result"
        value, problem = self._read(payload)
        raw = payload if problem else None
        if isinstance(value, dict):
            value = value.get("value")
        record = _audit_record(outbox, arrived, f"{device}/set/{point}", device, "set", point, value, raw=raw)
        result = WriteResult(ok=False, error="the gateway stopped before the device answered")
        try:
            if problem:
                result = WriteResult(ok=False, error=problem)
            elif view is None:
                result = WriteResult(ok=False, error=f"unknown device {device!r}")
            elif writer is None:
                result = WriteResult(ok=False, error=f"{device} takes no writes")
            elif refusal:
                result = WriteResult(ok=False, error=refusal)
            else:
                # Before the device is touched: a crash after this line still leaves a trace of the request.
                self._record(record(ok=None, stage="request"))
                result = await writer(Write(device, point, value, origin=outbox.sink.name))
        except Exception as exc:
            log.exception("set %s.%s failed", device, point)
            result = WriteResult(ok=False, error=f"the gateway failed to carry it out: {exc!r}"[:300])
        finally:
            log.info("set %s.%s = %r: %s", device, point, payload[:64], "ok" if result.ok else result.error)
            self._answer(outbox, result_topic, {"ok": result.ok, "value": result.value, "error": result.error})
            self._record(
                record(
                    ok=result.ok,
                    result=result.value,
                    error=result.error,
                    duration_ms=(time.monotonic() - started) * 1000,
                )
            )

    async def _cmd(self, outbox: Outbox, device: str, payload: bytes) -> None:
        arrived, started = time.time_ns(), time.monotonic()
        view = self.devices.get(device)
        commander = view.profile.commander if view is not None else None
        go_on, refusal = self._admit(outbox, device, commander is not None, "commands")
        if not go_on:
            return
        body, problem = self._read(payload)
        raw = payload if problem else None
        cmd_id: object = body.get("id") if isinstance(body, dict) else None
        request_id = None if cmd_id is None else cmd_id if isinstance(cmd_id, str) else encode_json(cmd_id).decode()
        name = body.get("name") if isinstance(body, dict) else None
        args = body.get("args", {}) if isinstance(body, dict) else body
        target = name if isinstance(name, str) else None
        record = _audit_record(outbox, arrived, f"{device}/cmd", device, "cmd", target, args, request_id, raw)
        result = CommandResult(ok=False, error="the gateway stopped before the device answered")
        try:
            if problem:
                result = CommandResult(ok=False, error=problem)
            elif not isinstance(body, dict) or not isinstance(name, str) or not name:
                result = CommandResult(ok=False, error='payload must be {"name": str, "args": {...}, "id": optional}')
            elif not isinstance(args, dict):
                result = CommandResult(ok=False, error="args must be a JSON object")
            elif view is None:
                result = CommandResult(ok=False, error=f"unknown device {device!r}")
            elif commander is None:
                result = CommandResult(ok=False, error=f"{device} takes no commands")
            elif refusal:
                result = CommandResult(ok=False, error=refusal)
            else:
                self._record(record(ok=None, stage="request"))
                result = await commander(Command(device, name, args, request_id))
        except Exception as exc:
            log.exception("cmd %s failed", device)
            result = CommandResult(ok=False, error=f"the gateway failed to carry it out: {exc!r}"[:300])
        finally:
            log.info("cmd %s: %s", device, "ok" if result.ok else result.error)
            reply = {"id": cmd_id, "ok": result.ok, "result": result.result, "error": result.error}
            self._answer(outbox, f"{device}/cmd/result", reply)
            self._record(
                record(
                    ok=result.ok,
                    result=result.result,
                    error=result.error,
                    duration_ms=(time.monotonic() - started) * 1000,
                )
            )

    async def stop(self) -> None:
        """Wait briefly for writes in progress."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
